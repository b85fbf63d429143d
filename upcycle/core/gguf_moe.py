"""Loading an MoE GGUF file (llama.cpp's `llama` architecture with experts, as `upcycle convert ... OUT.gguf` writes
it) into transformers as a MixtralForCausalLM, dequantized to float32.

transformers reads GGUF files itself, but maps the `llama` architecture to a dense LlamaForCausalLM: the expert
tensors of a llama.cpp mixtral have no place there. Here the configuration comes from the file's metadata, the
tensor names from gguf's own name table (gguf.get_tensor_name_map), q/k go back from llama.cpp's rotary order to
transformers', and the per-expert output scale (`ffn_down_exps.scale`) is folded into the experts' down
projection, so the model computes what llama.cpp computes from the same file, up to the dequantization that
transformers does for any GGUF file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from upcycle.core.errors import InputError, UnsupportedError


def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise InputError("reading GGUF files needs the gguf package: pip install 'upcycle[gguf]'") from None
    try:
        return GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct.error/... on damaged files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path} is not a readable GGUF file: {msg}") from None


def _value(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def expert_count(reader) -> int:
    """How many experts the GGUF file's architecture declares (0: a dense model)."""
    from gguf import Keys

    arch = _value(reader, "general.architecture")
    return int(_value(reader, Keys.LLM.EXPERT_COUNT.format(arch=arch), 0) or 0)


def moe_reader(path: str | Path):
    """The file's reader when it holds an MoE (to pass on to load_gguf_moe), None for a dense GGUF file."""
    reader = _reader(Path(path))
    return reader if expert_count(reader) else None


def _config(reader, path: Path):
    from gguf import Keys
    from transformers import MixtralConfig

    arch = _value(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedError(f"{path}: a {arch} MoE GGUF is not loaded by upcycle (only llama.cpp's llama "
                               "architecture with experts, the mixtral layout that upcycle convert writes)")
    k = lambda key, default=None: _value(reader, key.format(arch=arch), default)  # noqa: E731
    if k(Keys.Rope.SCALING_TYPE) not in (None, "none") or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise UnsupportedError(f"{path}: rope scaling in a GGUF MoE is not supported by this loader")
    hidden, heads = int(k(Keys.LLM.EMBEDDING_LENGTH)), int(k(Keys.Attention.HEAD_COUNT))
    names = {t.name for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = int(k(Keys.LLM.VOCAB_SIZE) or (len(tokens.data) if tokens is not None else 0))
    return MixtralConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(k(Keys.LLM.FEED_FORWARD_LENGTH)),
        num_hidden_layers=int(k(Keys.LLM.BLOCK_COUNT)),
        num_attention_heads=heads,
        num_key_value_heads=int(k(Keys.Attention.HEAD_COUNT_KV, heads)),
        head_dim=int(k(Keys.Attention.KEY_LENGTH, hidden // heads)),
        max_position_embeddings=int(k(Keys.LLM.CONTEXT_LENGTH, 2048)),
        rms_norm_eps=float(k(Keys.Attention.LAYERNORM_RMS_EPS, 1e-5)),
        rope_parameters={"rope_type": "default", "rope_theta": float(k(Keys.Rope.FREQ_BASE, 10000.0))},
        num_local_experts=int(k(Keys.LLM.EXPERT_COUNT)),
        num_experts_per_tok=int(k(Keys.LLM.EXPERT_USED_COUNT)),
        tie_word_embeddings="output.weight" not in names,
        sliding_window=None,
        router_jitter_noise=0.0,
        bos_token_id=_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_value(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_value(reader, "tokenizer.ggml.padding_token_id"),
    )


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary order of q/k rows (pairs interleaved per head) back to transformers' halves."""
    shape = w.shape
    return np.ascontiguousarray(w.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape))


def load_gguf_moe(path: str | Path, reader=None):
    """The MoE GGUF at `path` as a float32 MixtralForCausalLM (eval mode, CPU)."""
    import torch
    from gguf import MODEL_ARCH, dequantize, get_tensor_name_map
    from transformers import MixtralForCausalLM

    path = Path(path)
    reader = reader or _reader(path)
    cfg = _config(reader, path)
    tensors = {t.name: t for t in reader.tensors}

    def f32(name: str) -> np.ndarray:
        t = tensors.pop(name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        # a copy: f32 tensors come back as views of the file's read-only memory map
        return np.array(dequantize(t.data, t.tensor_type), dtype=np.float32, copy=True).reshape(shape)

    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is set from the file below; random init of the experts is slow
        model = MixtralForCausalLM(cfg)
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    state = {}
    for hf in model.state_dict():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if hf.endswith(".mlp.experts.gate_up_proj"):  # transformers fuses gate and up, gate first
            i = hf.split(".")[2]
            w = np.concatenate([f32(f"blk.{i}.ffn_gate_exps.weight"), f32(f"blk.{i}.ffn_up_exps.weight")], axis=1)
        else:
            name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise UnsupportedError(f"{path}: gguf's name table has no GGUF name for {hf}")
            if hf.endswith("down_proj"):
                name += ".weight"
            if name not in tensors:
                raise InputError(f"{path} lacks tensor {name}")
            w = f32(name)
            if ".self_attn.q_proj." in hf or ".self_attn.k_proj." in hf:
                w = _unpermute(w, cfg.num_attention_heads if ".q_proj." in hf else cfg.num_key_value_heads)
            if hf.endswith(".mlp.experts.down_proj"):
                scale = name.removesuffix(".weight") + ".scale"
                if scale in tensors:
                    w = w * f32(scale)[:, None, None]
        state[hf] = torch.from_numpy(w)
    if tensors:
        raise UnsupportedError(f"{path}: tensors with no place in a MixtralForCausalLM: {', '.join(sorted(tensors)[:3])}")
    model.load_state_dict(state, strict=not cfg.tie_word_embeddings)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    return model
