"""
Tests for the GPU path's guard rails that run on CPU: the compute dtype refuses float16 (no loss scaling).
"""

import pytest
import torch

from nanochat import common

def test_float16_is_refused_naming_bf16_and_fp32(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DTYPE", "float16")
    with pytest.raises(ValueError, match="NANOCHAT_DTYPE=float16 is not supported") as e:
        common._detect_compute_dtype()
    assert "NANOCHAT_DTYPE=bfloat16" in str(e.value) and "NANOCHAT_DTYPE=float32" in str(e.value)
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):  # the supported ones still work
        monkeypatch.setenv("NANOCHAT_DTYPE", name)
        assert common._detect_compute_dtype()[0] == dtype
