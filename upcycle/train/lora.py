"""LoRA adapters through PEFT (`--lora router,experts,attention --lora-rank R --lora-alpha A`).

What is adapted, by --lora group:

* attention, shared, dense_mlp: the nn.Linear modules of that role (`lora.Linear`, PEFT's classic LoRA);
* router: each MoE layer's router weight [E, H], and experts: each layer's fused expert tensors gate_up_proj
  [E, 2I, H] and down_proj [E, H, I]. Neither is an nn.Linear in transformers 5, so they are targeted as
  parameters (PEFT's `target_parameters`, `lora.ParamWrapper`): a fused [E, out, in] tensor gets one rank-R
  pair per expert, and during each forward the module computes with W + scale x B_e A_e. Every MoE type the tool
  writes stores its experts this way, so every type can be adapted (tests/test_domain_experts.py runs each).

The run's routers keep upcycle's fp32 forward (upcycle.train.router): PEFT wraps the router module, parametrises
its weight and calls the module, whose patched forward reads the adapted weight.

What is written: every checkpoint-STEP/ holds the *base* weights (the input's, with the groups that --train
trains fully at their current values) as a standard folder, plus checkpoint-STEP/adapter/ (PEFT's format,
fp32), which is what an exact resume needs. final/ is the merged model, W + scale x B A (merged in place at the
end of the run), a standard Hugging Face folder that plain AutoModelForCausalLM loads; RUN/adapter/ is the final adapter. The adapter applies to the input
model (its base_model_name_or_path); if --train also trained groups fully, those are only in final/.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from upcycle.core.errors import InputError, TrainingError, UsageError
from upcycle.families.moe.routing import MoELayer
from upcycle.train.freeze import _module_param_names, parameter_role

if TYPE_CHECKING:
    from upcycle.train.config import TrainConfig

ADAPTER_DIR = "adapter"
ADAPTER_NAME = "default"  # PEFT's adapter name; it does not appear in the saved files
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraSetup:
    model: object  # the PeftModel around the Hugging Face model
    modules: dict[str, list[str]]  # group -> adapted nn.Linear module names
    parameters: dict[str, list[str]]  # group -> adapted parameter names (router, experts)
    adapter_ids: frozenset[int] = frozenset()  # ids of every adapter parameter
    router_ids: frozenset[int] = frozenset()  # ids of the routers' adapter parameters
    counts: dict[str, int] = field(default_factory=dict)  # adapter parameters per group
    expert_ids: frozenset[int] = frozenset()  # ids of the routed experts' adapter parameters

    def describe(self) -> dict:
        return {"targets": {g: len(self.modules.get(g, [])) + len(self.parameters.get(g, []))
                            for g in sorted(set(self.modules) | set(self.parameters))},
                "adapter_parameters": self.counts}


def find_targets(model, layers: list[MoELayer], groups: tuple[str, ...], model_name: str
                 ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """({group: nn.Linear module names}, {group: parameter names}) to adapt; UsageError for a group that matches
    no parameter of the model."""
    from torch import nn

    routers, experts, _ = _module_param_names(model, layers)
    modules: dict[str, list[str]] = {}
    params: dict[str, list[str]] = {}
    for name in sorted(routers):
        if "router" in groups:
            params.setdefault("router", []).append(name)
    for name in sorted(experts):
        if "experts" in groups:
            params.setdefault("experts", []).append(name)
    linear_groups = [g for g in groups if g not in ("router", "experts")]
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module.weight.numel() == 0:
            continue
        role = parameter_role(f"{name}.weight", routers, experts)
        if role in linear_groups:
            modules.setdefault(role, []).append(name)
    missing = [g for g in groups if not modules.get(g) and not params.get(g)]
    if missing:
        raise UsageError(f"--lora {missing[0]}: matches no parameter of {model_name}")
    return modules, params


def apply_lora(model, layers: list[MoELayer], cfg: "TrainConfig", resume_dir: Path | None = None) -> LoraSetup:
    """Wrap `model` with PEFT LoRA adapters on cfg.lora's groups (loading them from resume_dir/adapter when
    resuming); the base weights are frozen here, apply_selection then unfreezes what --train trains fully."""
    from peft import LoraConfig, get_peft_model

    modules, params = find_targets(model, layers, cfg.lora, cfg.model)
    names = [n for g in modules.values() for n in g]
    targets = [n for g in params.values() for n in g]
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                        target_modules=("^(?:" + "|".join(map(re.escape, names)) + ")$") if names else None,
                        target_parameters=targets or None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT and transformers deprecation notices, not for the user
        peft_model = get_peft_model(model, config, adapter_name=ADAPTER_NAME)
    peft_model.peft_config[ADAPTER_NAME].base_model_name_or_path = str(cfg.model)
    if resume_dir is not None:
        load_adapter(peft_model, resume_dir / ADAPTER_DIR)
    group_of = {n: g for g, ns in modules.items() for n in ns} | {n: g for g, ns in params.items() for n in ns}
    ids, router_ids, expert_ids, counts = set(), set(), set(), {}
    for name, p in peft_model.named_parameters():
        if ".lora_" not in name:
            continue
        owner = _hf_name(name.split(".lora_")[0])
        group = group_of.get(owner) or next((group_of[t] for t in targets if t.rpartition(".")[0] == owner), "other")
        ids.add(id(p))
        counts[group] = counts.get(group, 0) + p.numel()
        if group == "router":
            router_ids.add(id(p))
        elif group == "experts":
            expert_ids.add(id(p))
    return LoraSetup(peft_model, modules, params, frozenset(ids), frozenset(router_ids), counts, frozenset(expert_ids))


def _hf_name(peft_name: str) -> str:
    """A PeftModel parameter or module name -> the Hugging Face model's own name for the wrapped weight."""
    return peft_name.removeprefix(_PEFT_PREFIX).replace(".base_layer", "")


def _is_adapter_key(key: str) -> bool:
    return ".lora_" in key


def base_state_dict(state_dict: dict) -> dict:
    """The PeftModel's state dict -> the base model's, under the Hugging Face names (adapters left out)."""
    return {_hf_name(k): v for k, v in state_dict.items() if not _is_adapter_key(k)}


def merge_into_base(peft_model, state_dict: dict) -> dict:
    """Merge every adapter into its base weight in place, W += scale x B A (PEFT's own `merge`, as
    merge_and_unload does it), and return the base model's state dict, now merged, under the Hugging Face names.

    In place because it runs at the end of a run: a copy would hold a second set of the adapted (expert) weights
    while final/ is written. `state_dict` shares the parameters' storage, so it sees the merged values."""
    import torch
    from peft.tuners.lora import LoraLayer

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in peft_model.modules():
            if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A and not module.merged:
                module.merge(adapter_names=[ADAPTER_NAME])
    return base_state_dict(state_dict)


def save_adapter(peft_model, folder: Path) -> None:
    """PEFT's adapter folder: adapter_config.json and adapter_model.safetensors (fp32)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(folder), safe_serialization=True)


def load_adapter(peft_model, folder: Path) -> None:
    """Load a checkpoint's adapter weights into a PeftModel built with the same options (resume), exactly."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        raise TrainingError(f"cannot resume from {folder.parent}: it has no {ADAPTER_DIR}/adapter_model.safetensors")
    try:
        weights = load_file(str(file))
    except Exception as exc:  # a truncated or foreign file: say which
        raise InputError(f"cannot read {file}: {exc}") from None
    result = set_peft_model_state_dict(peft_model, weights, adapter_name=ADAPTER_NAME)
    missing = [k for k in result.missing_keys if _is_adapter_key(k)]
    if missing or result.unexpected_keys:
        what = missing[0] if missing else result.unexpected_keys[0]
        raise TrainingError(f"cannot resume from {folder.parent}: its adapter does not fit this model ({what})")


def check_resume(state: dict, cfg: "TrainConfig", ckpt: Path) -> None:
    """The checkpoint's LoRA options must be this run's (the adapter shapes and what trains depend on them)."""
    before, now = state.get("lora"), cfg.lora_json()
    if before == now:
        return
    if before is None:
        raise UsageError(f"--resume: {ckpt} has no LoRA adapter; resume without --lora")
    said = f"--lora {','.join(before['groups'])} --lora-rank {before['rank']} --lora-alpha {before['alpha']:g}"
    raise UsageError(f"--resume: {ckpt} was trained with {said}; give the same LoRA options")


def lora_estimate(spec: str, cfg: "TrainConfig") -> list[tuple[str, int]]:
    """Memory parts a LoRA run adds, from file headers: the adapters with their gradients and AdamW states, and
    for router and experts (adapted as parameters) one float32 W + delta per adapted tensor, computed in every
    forward and kept for the backward. Adapter sizes are counted per on-disk tensor (an upper bound for fused
    expert tensors)."""
    from upcycle.train.memory import tensor_role  # the --train group of an on-disk tensor name

    if not cfg.lora:
        return []
    shapes = _tensor_shapes(spec, cfg.allow_pickle)
    adapters = materialised = 0
    for name, shape in shapes.items():
        if len(shape) != 2 or name.endswith("e_score_correction_bias"):
            continue
        role = tensor_role(name)
        if role not in cfg.lora:
            continue
        adapters += cfg.lora_rank * (shape[0] + shape[1])
        if role in ("router", "experts"):
            materialised += shape[0] * shape[1] * 4
    return [("LoRA adapters and their optimizer", adapters * 16), ("adapted weights per forward", materialised)]


def _tensor_shapes(spec: str, allow_pickle: bool) -> dict[str, tuple[int, ...]]:
    p = Path(spec)
    if p.suffix.lower() == ".gguf":
        from upcycle.storage.parent import open_parent

        ckpt = open_parent(p)
        try:
            return {n: tuple(ckpt.source.meta(n).shape) for n in ckpt.source.names()}
        finally:
            ckpt.close()
    from upcycle.storage.sources import PickleSource, SafetensorsSource

    if not (p / "config.json").is_file():
        return {}
    source = SafetensorsSource(p) if any(p.glob("*.safetensors")) else PickleSource(p) if allow_pickle else None
    if source is None:
        return {}
    try:
        return {n: tuple(source.meta(n).shape) for n in source.names()}
    finally:
        source.close()
