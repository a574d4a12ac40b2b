"""Fixtures of the runtime tests."""

from __future__ import annotations

import pytest

from gptexport.artifacts.modeldir import load_model_dir
from gptexport.runtime.backends.ort import OrtRunner


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    """The tiny model on ONNX Runtime's CPU provider, one thread, activated."""
    r = OrtRunner(load_model_dir(tiny_model_dir), threads=1)
    r.activate()
    yield r
    r.deactivate()
