"""
Tests of the compute dtype's choice that run on CPU: float16 is refused (no loss scaling); a CPU
computes in bf16 exactly where it multiplies bf16 natively, unless NANOCHAT_DTYPE says otherwise.
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

@pytest.mark.parametrize("amx, avx512_bf16, expected", [
    (True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, torch.float32)])
def test_cpu_computes_in_bf16_only_where_it_has_it_natively(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    dtype, reason = common._detect_compute_dtype()
    assert dtype == expected and ("AMX" if amx else "AVX512-BF16") in reason  # printed at start
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")  # the override wins over the hardware
    assert common._detect_compute_dtype() == (torch.float32, "set by NANOCHAT_DTYPE=float32")
