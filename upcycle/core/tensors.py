"""Tensor storage types and conversions in plain numpy.

Conversion never imports torch: on this class of machine `import torch` alone costs about 2 s, more than
writing a 135M-parameter model eight times over. bfloat16 has no numpy type, so it is carried as its raw
uint16 bit pattern and widened/narrowed by bit arithmetic (round-to-nearest-even, as torch does).
"""

from __future__ import annotations

import numpy as np

# safetensors dtype code -> numpy storage type (BF16 stored as raw uint16 bits).
STORAGE = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")

# The dtype names every command accepts and writes (the one list of them), their short aliases, and their
# safetensors codes.
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
CODE_OF = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
NAME_OF = {v: k for k, v in CODE_OF.items()}


def itemsize(code: str) -> int:
    return STORAGE[code].itemsize


def nbytes(code: str, shape: tuple[int, ...]) -> int:
    n = itemsize(code)
    for d in shape:
        n *= d
    return n


def to_f32(a: np.ndarray, code: str) -> np.ndarray:
    """Widen stored values to float32 (exact for F16/BF16/F32)."""
    if code == "F32":
        return a
    if code == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    if code in ("F16", "F64"):
        return a.astype(np.float32)
    raise TypeError(f"not a floating tensor: {code}")


def from_f32(a: np.ndarray, code: str) -> np.ndarray:
    """Narrow float32 values to the storage of `code`, rounding to nearest even."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if code == "F32":
        return a
    if code == "BF16":
        bits = a.view(np.uint32)
        rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
        # NaNs must stay NaN (the rounding add could carry a NaN payload into infinity)
        nan = np.isnan(a)
        if nan.any():
            rounded[nan] = ((bits[nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)
        return rounded
    if code == "F16":
        return a.astype(np.float16)
    if code == "F64":
        return a.astype(np.float64)
    raise TypeError(f"not a floating tensor: {code}")


def convert(a: np.ndarray, src: str, dst: str) -> np.ndarray:
    if src == dst:
        return a
    return from_f32(to_f32(a, src), dst)


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, plain integers are bytes."""
    s = text.strip().upper().replace(" ", "")
    units = {
        "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
        "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9, "B": 1,
    }
    num, mult = s, 1
    for unit, factor in units.items():
        if s.endswith(unit):
            num, mult = s[: -len(unit)], factor
            break
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 500MB, 5GB, 2GiB)") from None
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return int(value * mult)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def human_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))
