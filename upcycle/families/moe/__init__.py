"""The registry of Hugging Face MoE output types: one module per type family, one `MoEType` entry per model_type.

Everything else in the tool asks this registry about a type (its names, scoring rule and routing rules, tensor
names, config.json, what it can hold exactly); no other module branches on an MoE model_type string.

    base.py       MoEType (the entry: fields, supports(), moe_tensors(), build_config()), ROUTINGS
    mixtral.py    mixtral
    qwen.py       qwen2_moe, qwen3_moe
    granite.py    granitemoe, granitemoeshared
    deepseek.py   glm4_moe, dots1 (sigmoid scores, selection bias, routed_scaling_factor)
    flex_olmo.py  flex_olmo

Adding an MoE type: write one module here (subclass MoEType, override `moe_config()` and where the layout differs
`expert_tensors()` / `shared_tensors()`; export TYPES), list it in `_MODULES` and give it its place in auto's
`PREFERENCE` (both below), and add one row to the independent support matrix in tests/test_convert_exact.py,
which converts tiny random parents of every family into it and compares logits (and, per routing rule, in
tests/test_routing_rules.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from upcycle.core.errors import UnsupportedError
from upcycle.families.moe import deepseek, flex_olmo, granite, mixtral, qwen
from upcycle.families.moe.base import MoEType, Part, TensorSpec
from upcycle.families.moe.shape import ROUTINGS, MoEShape

if TYPE_CHECKING:
    from upcycle.families.parents import ParentSpec

_MODULES = (mixtral, qwen, flex_olmo, deepseek, granite)
MOE_TYPES: dict[str, MoEType] = {t.model_type: t for m in _MODULES for t in m.TYPES}

# auto picks the first that fits: the most widely supported types first (vLLM, SGLang, llama.cpp all run
# mixtral and qwen2_moe; the others have fewer runtimes).
PREFERENCE = ("mixtral", "qwen2_moe", "qwen3_moe", "granitemoe", "granitemoeshared", "dots1", "glm4_moe", "flex_olmo")
if set(PREFERENCE) != set(MOE_TYPES):  # pragma: no cover - a new type module without its place in auto's order
    raise AssertionError(f"PREFERENCE and the registered types differ: {sorted(set(PREFERENCE) ^ set(MOE_TYPES))}")

__all__ = ["MOE_TYPES", "PREFERENCE", "ROUTINGS", "MoEShape", "MoEType", "Part", "TensorSpec", "choose_format", "format_names",
           "moe_type", "portability_notes", "supports"]


def moe_type(model_type: str) -> MoEType | None:
    """The registry entry of a model_type, None for a type that is not an MoE type this tool writes."""
    return MOE_TYPES.get(model_type)


def format_names() -> tuple[str, ...]:
    """What --format accepts: auto, then every type in auto's order."""
    return ("auto", *PREFERENCE)


def supports(fmt: MoEType, parent: ParentSpec, recipe: MoEShape, moe_layers: list[int], explain: bool = False):
    return fmt.supports(parent, recipe, moe_layers, explain=explain)


def portability_notes(fmt: MoEType, parent: ParentSpec, recipe: MoEShape) -> list[str]:
    return fmt.portability_notes(parent, recipe)


def choose_format(parent: ParentSpec, recipe: MoEShape, moe_layers: list[int], requested: str = "auto") -> MoEType:
    """The requested type if it fits, else the first fitting type in PREFERENCE; refuse with reasons otherwise."""
    types = [MOE_TYPES[n] for n in PREFERENCE]
    if requested != "auto":
        fmt = MOE_TYPES[requested]
        why = fmt.supports(parent, recipe, moe_layers, explain=True)
        if why:
            fits = [t.model_type for t in types if t.supports(parent, recipe, moe_layers)]
            alt = f"; types that fit: {', '.join(fits)}" if fits else "; no type fits these options"
            raise UnsupportedError(f"--format {fmt.model_type} cannot hold this {parent.model_type} parent exactly: {'; '.join(why)}{alt}")
        return fmt
    for t in types:
        if t.supports(parent, recipe, moe_layers):
            return t
    reasons = "; ".join(f"{t.model_type}: {t.supports(parent, recipe, moe_layers, explain=True)[0]}" for t in types)
    raise UnsupportedError(f"no MoE type holds this {parent.model_type} parent with these options exactly ({reasons})")
