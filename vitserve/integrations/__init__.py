"""vitserve where people run language models: Hugging Face transformers (`transformers.py`)."""
