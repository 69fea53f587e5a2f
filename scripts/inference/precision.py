"""bfloat16 autocast on the CPU, only where the CPU computes bfloat16 natively.

A CPU with AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake) or AMX (Intel Sapphire Rapids and later) runs
bfloat16 convolutions and matrix products about twice as fast as float32 (measured in docs/benchmarks.md). Without
them PyTorch emulates bfloat16 and the network runs slower than in float32, so asking for it there is refused.
"""

from __future__ import annotations

import torch

from scripts.errors import ConfigError

__all__ = ["cpu_computes_bfloat16", "autocast_dtype"]


def cpu_computes_bfloat16() -> bool:
    """Whether this CPU has AVX512-BF16 or AMX instructions (PyTorch's own CPU feature probes)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def autocast_dtype(amp: bool | str, amp_dtype: str, device: torch.device | str, backend: str = "pytorch"
                   ) -> torch.dtype | None:
    """The dtype a PyTorch network runs in under inference's ``amp`` on ``device``, or None for float32 (``amp``
    off, or the ONNX backend, whose precision is the exported model's). On the CPU, bfloat16 only, and only where the
    CPU computes it natively; elsewhere ``ConfigError``."""
    from scripts.config import as_bool

    if not as_bool(amp, "amp") or backend != "pytorch":
        return None
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(amp_dtype))
    if dtype is None:
        raise ConfigError(f"'amp_dtype' is {amp_dtype!r}; autocast runs in 'bfloat16' or 'float16'.")
    if torch.device(device).type == "cpu":
        if dtype != torch.bfloat16:
            raise ConfigError(f"'amp' on the CPU runs in bfloat16 only; 'amp_dtype' is {amp_dtype}. "
                              "Set --amp_dtype bfloat16, or --amp false.")
        if not cpu_computes_bfloat16():
            raise ConfigError("'amp' is true, but this CPU has neither AVX512-BF16 nor AMX: bfloat16 would be "
                              "emulated and slower than float32. Set --amp false (the default on a machine without "
                              "CUDA).")
    return dtype
