"""vitserve: a serving engine for the vision encoders of multimodal LLMs."""

__version__ = "0.1.0"
