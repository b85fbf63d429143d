"""Dense parent families as data: one table entry per model_type, and the parsed facts of one parent.

Everything downstream (format choice, tensor plan, config writing) works from `ParentSpec`, never from a raw
config.json, so that configs written by transformers 4.x (rope_theta, rope_scaling) and 5.x (rope_parameters)
read the same. Parsing needs no transformers import: conversion stays fast to start.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from upcycle.core.errors import UnsupportedError


@dataclass(frozen=True)
class ParentArch:
    model_type: str
    qkv_bias: str = "config"  # "never" | "always" | "config" (from attention_bias)
    o_bias: str = "config"  # "never" | "config" (attention_bias covers o_proj too)
    qk_norm: str | None = None  # None | "head" (per head, Qwen3) | "full" (whole projection, OLMo 2)
    norm_style: str = "pre"  # "pre" (input/post_attention norms before blocks) | "post" (OLMo 2)
    fused_qkv: bool = False  # phi3: self_attn.qkv_proj
    fused_gate_up: bool = False  # phi3: mlp.gate_up_proj
    multipliers: bool = False  # granite: embedding/residual/attention multipliers, logits_scaling
    sliding: str = "none"  # "none" | "all" (sliding_window applies to every layer) | "qwen" (use_sliding_window)
    gguf: str | None = None  # llama.cpp architecture name when transformers can load its GGUF files
    gguf_permute_qk: bool = False
    defaults: dict = field(default_factory=dict)


_COMMON = dict(rope_theta=10000.0, rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False, attention_bias=False)

ARCHS: dict[str, ParentArch] = {
    a.model_type: a
    for a in [
        ParentArch("llama", gguf="llama", gguf_permute_qk=True, defaults=dict(max_position_embeddings=2048)),
        ParentArch("mistral", qkv_bias="never", o_bias="never", sliding="all", gguf="llama", gguf_permute_qk=True,
                   defaults=dict(max_position_embeddings=4096 * 32, sliding_window=4096)),
        ParentArch("qwen2", qkv_bias="always", o_bias="never", sliding="qwen", gguf="qwen2",
                   defaults=dict(max_position_embeddings=32768)),
        ParentArch("qwen3", qk_norm="head", sliding="qwen", gguf="qwen3", defaults=dict(max_position_embeddings=32768)),
        ParentArch("phi3", qkv_bias="never", o_bias="never", fused_qkv=True, fused_gate_up=True, sliding="all", gguf="phi3",
                   defaults=dict(max_position_embeddings=4096, rms_norm_eps=1e-5, sliding_window=None)),
        ParentArch("olmo2", qk_norm="full", norm_style="post", defaults=dict(max_position_embeddings=2048, rms_norm_eps=1e-5)),
        ParentArch("granite", multipliers=True, defaults=dict(max_position_embeddings=2048)),
    ]
}

# Families that look close but cannot be held by any MoE type; said explicitly so the refusal is informative.
WHY_NOT = {
    "gemma": "Gemma's (1 + weight) norms and scaled embeddings have no exact MoE counterpart here",
    "gemma2": "Gemma 2's soft-capping and extra norms exist in no Hugging Face MoE type",
    "gemma3": "Gemma 3's sandwich norms and soft-capping exist in no Hugging Face MoE type",
    "gpt2": "GPT-2's LayerNorm, learned positions and non-gated MLP exist in no Hugging Face MoE type",
    "gpt_neox": "GPT-NeoX's parallel residual and LayerNorm exist in no Hugging Face MoE type",
    "mixtral": "it is already a Mixture-of-Experts model",
    "qwen2_moe": "it is already a Mixture-of-Experts model",
    "qwen3_moe": "it is already a Mixture-of-Experts model",
}


def supported_parents() -> str:
    return ", ".join(ARCHS)


@dataclass(frozen=True)
class ParentSpec:
    """What a dense parent is, in the terms the MoE formats need."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    hidden_act: str
    max_position_embeddings: int
    rope_parameters: dict  # transformers-5 style: rope_type, rope_theta, scaling fields, partial_rotary_factor
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: str | None
    norm_style: str
    layer_windows: tuple  # per layer: None (full attention) or the sliding window size
    multipliers: dict  # granite's four multipliers; {} for the others
    token_ids: dict  # bos/eos/pad token ids as given
    attention_dropout: float
    initializer_range: float
    torch_dtype: str | None
    raw: dict  # the config.json it was parsed from

    @property
    def arch(self) -> ParentArch:
        return ARCHS[self.model_type]

    @property
    def partial_rotary_factor(self) -> float:
        return float(self.rope_parameters.get("partial_rotary_factor", 1.0))

    @property
    def sliding_windows(self) -> set:
        return {w for w in self.layer_windows if w is not None}

    @property
    def has_default_head_dim(self) -> bool:
        return self.head_dim * self.num_heads == self.hidden_size


def _rope_parameters(cfg: dict, defaults: dict) -> dict:
    if isinstance(cfg.get("rope_parameters"), dict):
        rope = dict(cfg["rope_parameters"])
    else:
        rope = dict(cfg.get("rope_scaling") or {})
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope.setdefault("rope_type", "default")
        rope["rope_theta"] = cfg.get("rope_theta", defaults["rope_theta"])
    if "partial_rotary_factor" in cfg and "partial_rotary_factor" not in rope:
        rope["partial_rotary_factor"] = cfg["partial_rotary_factor"]
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", defaults["rope_theta"])
    return rope


def _layer_windows(cfg: dict, arch: ParentArch, layers: int) -> tuple:
    window = cfg.get("sliding_window", arch.defaults.get("sliding_window"))
    if arch.sliding == "none" or not window:
        return (None,) * layers
    if arch.sliding == "qwen":
        if not cfg.get("use_sliding_window", False):
            return (None,) * layers
        types = cfg.get("layer_types")
        if types:
            return tuple(window if t == "sliding_attention" else None for t in types)
        start = cfg.get("max_window_layers", layers)
        return tuple(window if i >= start else None for i in range(layers))
    types = cfg.get("layer_types")
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (window,) * layers


def parse_parent_config(cfg: dict, *, where: str = "parent") -> ParentSpec:
    """Turn a dense parent's config.json into a ParentSpec, or refuse with a message that says why."""
    model_type = cfg.get("model_type")
    if model_type not in ARCHS:
        archs = cfg.get("architectures") or []
        if model_type in WHY_NOT:
            reason = WHY_NOT[model_type]
        elif archs and not any(a.endswith("ForCausalLM") for a in archs):
            reason = f"it is not a causal language model ({', '.join(archs)})"
        else:
            reason = "this family is not supported"
        raise UnsupportedError(
            f"{where}: cannot upcycle model_type {model_type!r}: {reason}. Supported parents: {supported_parents()}"
        )
    arch = ARCHS[model_type]
    d = {**_COMMON, **arch.defaults}

    def get(key):
        v = cfg.get(key)
        return d.get(key) if v is None else v

    if get("mlp_bias"):
        raise UnsupportedError(f"{where}: the MLP has biases (mlp_bias), and no Hugging Face MoE type has expert biases")
    act = get("hidden_act") or cfg.get("hidden_activation")
    try:
        hidden, heads, inter, layers = (int(cfg[k]) for k in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers"))
        vocab = int(cfg["vocab_size"])
    except KeyError as exc:
        raise UnsupportedError(f"{where}: config.json lacks {exc.args[0]}") from None
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    attention_bias = bool(get("attention_bias"))
    qkv_bias = {"never": False, "always": True, "config": attention_bias}[arch.qkv_bias]
    o_bias = {"never": False, "config": attention_bias}[arch.o_bias]
    multipliers = {}
    if arch.multipliers:
        keys = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")
        multipliers = {k: float(cfg.get(k, 1.0)) for k in keys}
    return ParentSpec(
        model_type=model_type,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        vocab_size=vocab,
        rms_norm_eps=float(get("rms_norm_eps")),
        hidden_act=act,
        max_position_embeddings=int(get("max_position_embeddings")),
        rope_parameters=_rope_parameters(cfg, d),
        tie_word_embeddings=bool(get("tie_word_embeddings")),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm=arch.qk_norm,
        norm_style=arch.norm_style,
        layer_windows=_layer_windows(cfg, arch, layers),
        multipliers=multipliers,
        token_ids={k: cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        attention_dropout=float(cfg.get("attention_dropout") or 0.0),
        initializer_range=float(cfg.get("initializer_range") or 0.02),
        torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
        raw=cfg,
    )
