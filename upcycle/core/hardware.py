"""What the machine runs fast. Used to pick defaults, never to refuse a choice the user made."""

from __future__ import annotations


def bf16_is_fast(device: str = "cpu") -> bool:
    """True where bf16 matmuls run natively: CUDA GPUs with bf16 support, CPUs with AMX or AVX512-BF16.

    Without those instructions PyTorch emulates bf16 on the CPU and it is several times slower than fp32
    (measured on a 2-core AVX512 Xeon without AVX512-BF16: 28 GFLOP/s bf16 against 116 GFLOP/s fp32), so
    autocast would cost time instead of saving it.
    """
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except RuntimeError:
            continue
    return False


def default_precision(device: str | None = None) -> str:
    """bf16 autocast where bf16 is native on `device` (default: CUDA when present, else the CPU), else fp32."""
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "bf16" if bf16_is_fast(device) else "fp32"
