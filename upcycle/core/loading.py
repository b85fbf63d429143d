"""Loading whole models for the commands that run them (verify, train, eval, data-driven router init).

Conversion itself never goes through here: it streams tensors (upcycle.storage.sources). This module is the one place
that knows how to turn "a folder, a .gguf file or a hub id" into a transformers model and tokenizer, safely:
no remote code unless asked, no pickle files unless asked.
"""

from __future__ import annotations

import os
from pathlib import Path

from upcycle.core.errors import InputError, UnsupportedError
from upcycle.core.paths import is_hub_id
from upcycle.core.tensors import DTYPE_ALIASES, FLOAT_DTYPES

DTYPES = {**{name: name for name in FLOAT_DTYPES}, **DTYPE_ALIASES}


def torch_dtype(name: str):
    import torch

    try:
        return getattr(torch, DTYPES[name])
    except KeyError:
        raise InputError(f"unknown dtype {name!r}: use {', '.join(FLOAT_DTYPES)}") from None


def split_gguf(spec: str | Path) -> tuple[str, str | None]:
    """('dir', 'file.gguf') for a GGUF file, (spec, None) otherwise."""
    p = Path(spec)
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise InputError(f"GGUF file not found: {p}")
        return str(p.parent), p.name
    return str(spec), None


def check_local_model_dir(path: Path, allow_pickle: bool = False) -> None:
    if not path.exists():
        raise InputError(f"no such file or folder: {path}")
    if not path.is_dir():
        raise InputError(f"{path} is neither a model folder nor a .gguf file")
    if not (path / "config.json").is_file():
        raise InputError(f"{path} has no config.json: not a Hugging Face model folder")
    has_st = any(path.glob("*.safetensors"))
    has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt"))
    if not has_st and has_pickle and not allow_pickle:
        raise InputError(
            f"{path} holds only PyTorch pickle weights (.bin); pickle can run code when loaded. "
            "Convert it to safetensors, or pass --allow-pickle if you trust the file"
        )
    if not has_st and not has_pickle:
        raise InputError(f"{path} holds no weights (*.safetensors)")
    # a truncated or half-copied file is one line here, not a traceback from safetensors inside transformers
    from upcycle.core.integrity import check_model_folder

    check_model_folder(path)


def load_tokenizer(spec: str | Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    folder, gguf = split_gguf(spec)
    try:
        if gguf:
            return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load a tokenizer from {spec}: {str(exc).splitlines()[0]}") from None


def load_causal_lm(
    spec: str | Path,
    *,
    dtype: str = "float32",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    experts_implementation: str | None = None,
    device: str | None = None,
):
    """Load a causal LM from a folder, a .gguf file or a hub id. Returns the model in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # transformers' per-tensor "Loading weights" bars drown our own progress display
    hf_logging.disable_progress_bar()
    folder, gguf = split_gguf(spec)
    if gguf:
        from upcycle.core.gguf_moe import load_gguf_moe, moe_reader

        # transformers reads llama.cpp's llama-with-experts as a dense llama: an MoE GGUF is loaded here instead
        reader = moe_reader(spec)
        if reader is not None:
            model = load_gguf_moe(spec, reader).to(torch_dtype(dtype))
            return model.to(device) if device else model
    if not gguf and not is_hub_id(spec):
        check_local_model_dir(Path(folder), allow_pickle=allow_pickle)
    kwargs: dict = dict(dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    if not allow_pickle:
        kwargs["use_safetensors"] = True if not gguf else None
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    if gguf:
        kwargs["gguf_file"] = gguf
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "does not recognize this architecture" in msg or "Unrecognized configuration" in msg:
            raise UnsupportedError(f"{spec}: {msg}") from None
        raise InputError(f"cannot load a causal language model from {spec}: {msg}") from None
    if gguf:
        # A GGUF-loaded model is already dequantized; dropping the quantizer marker lets it be saved and trained.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    if device:
        model.to(device)
    model.eval()
    return model


def export_dense(spec: str | Path, out: str | Path, *, dtype: str = "float32") -> Path:
    """Write a GGUF (or any loadable) parent as a plain safetensors folder with its tokenizer.

    Loading a GGUF file converts its tokenizer each time (tens of seconds); doing it once makes every later
    train/eval run start fast.
    """
    out = Path(out)
    model = load_causal_lm(spec, dtype=dtype)
    tok = load_tokenizer(spec)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out
