"""The error raised for input that cannot be preprocessed."""


class PreprocessError(ValueError):
    """An image or video that vitserve cannot turn into patches.

    The message says what was wrong and what is expected. It subclasses ValueError so
    callers that already catch the Hugging Face processor's ValueError keep working; the
    engine maps it to the `invalid_input` error code.
    """
