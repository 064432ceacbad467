"""Defaults and the names settings can take, for light modules (the command line), which must not
import the engine and torch to list them."""

DEFAULT_MODEL = "random:tiny"
ATTENTION_BACKENDS = ("flash_attn", "triton", "torch_varlen", "sdpa")
DTYPES = ("bfloat16", "float16", "float32")
SOAK_FAULTS = ("kill-worker", "kill-client", "cancel", "bad-input", "overload", "hostile")  # soak/faults.py
