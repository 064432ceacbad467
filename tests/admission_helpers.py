"""Helpers shared by the admission tests: the default config, pixels, and a rejection checker."""

from __future__ import annotations

import numpy as np
import pytest

from vitserve.engine.admission import AdmissionError, admit
from vitserve.preprocess import PreprocessConfig

CONFIG = PreprocessConfig()
NO_LIMIT = 10**9


def pixels(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def rejected(item, code: str = "invalid_input", *, config: PreprocessConfig = CONFIG, token_limit: int = NO_LIMIT,
             label: str | None = None) -> str:
    """The message of the AdmissionError `admit` raises, after checking its code."""
    kwargs = {} if label is None else {"label": label}
    with pytest.raises(AdmissionError) as info:
        admit(item, config, token_limit, **kwargs)
    err = info.value
    assert err.code == code, (err.code, err.message)
    assert err.message == str(err) and err.message
    return err.message
