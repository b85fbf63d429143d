"""What MODEL is (before loading any weight), which experts kernel to use, and loading it for training."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from upcycle.core.errors import InputError, UnsupportedError, UsageError
from upcycle.families.moe.routing import SUPPORTED_MOE
from upcycle.families.moe import moe_type


@dataclass(frozen=True)
class ModelInfo:
    model_type: str
    is_moe: bool
    has_selection_bias: bool
    folder: Path | None  # the local model folder (config.json, tokenizer, upcycle.json), None for GGUF / hub
    config: dict


@dataclass(frozen=True)
class MoELayout:
    """Where an MoE model's MoE layers are and what they hold, read from its config.json (no weight loaded)."""

    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    shared_width: int  # intermediate width of the shared expert(s); 0: none

    @property
    def experts_per_layer(self) -> dict[int, int]:
        return {i: self.num_experts for i in self.moe_layers}


def moe_layout(cfg: dict) -> MoELayout:
    """The MoE layout of a config.json of any MoE type this tool writes, by the keys transformers reads.

    Dense layers come from `mlp_only_layers` and `decoder_sparse_step` (qwen2_moe, qwen3_moe: a layer is sparse
    when it is not listed and (i + 1) % step == 0) or `first_k_dense_replace` (glm4_moe, dots1); every other type
    makes every layer MoE. tests/test_domain_experts.py checks this against the loaded model for every type."""
    layers = int(cfg.get("num_hidden_layers") or 0)
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts") or 0)
    only_dense = set(cfg.get("mlp_only_layers") or ())
    step = int(cfg.get("decoder_sparse_step") or 1)
    first = int(cfg.get("first_k_dense_replace") or 0)
    moe = tuple(i for i in range(layers) if i not in only_dense and (i + 1) % step == 0 and i >= first)
    if "shared_expert_intermediate_size" in cfg or "shared_intermediate_size" in cfg:
        shared = int(cfg.get("shared_expert_intermediate_size") or cfg.get("shared_intermediate_size") or 0)
    else:
        shared = int(cfg.get("n_shared_experts") or 0) * int(cfg.get("moe_intermediate_size") or 0)
    return MoELayout(layers, moe if experts else (), experts, int(cfg.get("num_experts_per_tok") or 1), shared)


def _dense_types() -> tuple[str, ...]:
    from upcycle.families.parents import ARCHS

    return tuple(ARCHS)


def inspect_model(spec: str) -> ModelInfo | None:
    """Model type and kind from config.json alone; None when that needs loading (a .gguf file).

    Raises UnsupportedError for a model that is neither a supported MoE nor a supported dense parent, and
    InputError for a path that is not a model.
    """
    from upcycle.core.loading import check_local_model_dir, is_hub_id

    p = Path(spec)
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise InputError(f"GGUF file not found: {p}")
        return None
    if p.exists() or not is_hub_id(spec):
        check_local_model_dir(p, allow_pickle=True)  # pickle is refused, if at all, when loading
        try:
            cfg = json.loads((p / "config.json").read_text())
        except ValueError as exc:
            raise InputError(f"{p / 'config.json'} is not valid JSON: {exc}") from None
        folder = p
    else:
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(spec).to_dict()
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read a model config for {spec}: {str(exc).splitlines()[0]}") from None
        folder = None
    return classify(cfg, spec, folder)


def classify(cfg: dict, spec: str, folder: Path | None) -> ModelInfo:
    model_type = cfg.get("model_type") or "(no model_type)"
    if model_type in SUPPORTED_MOE:
        return ModelInfo(model_type, True, moe_type(model_type).selection_bias, folder, cfg)
    if model_type in _dense_types():
        return ModelInfo(model_type, False, False, folder, cfg)
    raise UnsupportedError(
        f"{spec} is a {model_type} model: upcycle train takes an MoE model of type {', '.join(SUPPORTED_MOE)} "
        f"(what upcycle convert writes) or a dense parent of type {', '.join(_dense_types())}"
    )


def resolve_experts_impl(name: str, is_moe: bool) -> str | None:
    """The experts implementation name to load the model with; None for a dense model."""
    if not is_moe:
        return None
    if name in ("auto", "upcycle"):
        try:
            from upcycle.core.kernels import register_experts_kernel
        except ImportError:
            if name == "upcycle":
                raise UsageError("--experts-impl upcycle: upcycle.core.kernels is not available in this install") from None
            return "grouped_mm"
        registered = register_experts_kernel()
        if isinstance(registered, str) and registered:
            return registered
        if registered is False:  # the kernel declined (e.g. unsupported device)
            if name == "upcycle":
                raise UsageError("--experts-impl upcycle: the kernel is not available on this machine")
            return "grouped_mm"
        return "upcycle"
    return name


def _own_memory(model) -> None:
    """Give every parameter and buffer memory of its own, so that no mapping of the checkpoint file survives loading.

    transformers reads safetensors through a memory map and keeps the tensors that need no conversion as views of
    it; the map then stays whole in RSS, including the pages of per-expert tensors that loading stacked into the
    fused expert tensors (copies). For an 8-expert MoE those stale pages are as big as the experts themselves.
    Copying the few views (embeddings, attention, norms) lets the map go: one tensor at a time, so the peak of
    loading does not grow."""
    import torch

    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for t in list(module._parameters.values()) + list(module._buffers.values()):
                if t is not None and t.device.type == "cpu" and id(t) not in seen:  # tied weights: once
                    seen.add(id(t))
                    t.data = t.data.clone()


def load_for_training(spec: str, *, experts_impl: str | None, allow_pickle: bool):
    """The model in fp32 (the optimizer's master weights; bf16 comes from autocast), ready to train."""
    from upcycle.core.loading import load_causal_lm

    model = load_causal_lm(spec, dtype="float32", allow_pickle=allow_pickle, experts_implementation=experts_impl)
    _own_memory(model)
    model.config.use_cache = False
    # The model's own aux loss is added to .loss when this is on; ours comes from the recorded logits instead.
    if getattr(model.config, "output_router_logits", False):
        model.config.output_router_logits = False
    model.train()
    return model
