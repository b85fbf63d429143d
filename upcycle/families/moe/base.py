"""What every MoE output type is made of: `MoEType`, one frozen, self-validating entry per Hugging Face model_type.

An entry owns everything the rest of the tool needs to know about its type:

* names: `model_type` and the `architecture` class written into config.json;
* routing: its scoring family (`scoring`, what transformers' router computes) and the routing-weight rules it
  can store (`routings`, see `ROUTINGS`);
* on-disk tensor names: `moe_tensors()` lists the router, experts and shared expert of one MoE layer, each with
  the parent MLP pieces it is cut from (the plan turns them into producers);
* its config.json: `build_config()` writes the keys every type shares, `moe_config()` the type's own; a type
  module overrides `moe_config()` (and, where its layout differs, `expert_tensors()` / `shared_tensors()`);
* `supports(parent, recipe, layers, explain=True)`: every reason it cannot hold a parent and recipe exactly.

Keys either transformers generation reads are written explicitly and no default is relied upon: transformers 5
reads `rope_parameters`, 4.x reads `rope_theta`/`rope_scaling` and silently falls back to a default theta
without them; 4.57's qwen3_moe wants `num_experts`, and glm4_moe assumes partial_rotary_factor 0.5 unless told.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from upcycle.core.layers import format_ranges
from upcycle.families.moe.shape import ROUTINGS

if TYPE_CHECKING:
    from upcycle.families.moe.shape import MoEShape
    from upcycle.families.parents import ParentSpec

SCORINGS = ("softmax", "sigmoid", "topk_softmax")
_SHARED = (None, "gated", "plain")
_DENSE = (None, "any", "prefix")
_QKV_BIAS = ("never", "always", "config")
_QK_NORMS = (None, "head", "full")
_SLIDING = ("none", "uniform", "layer_types")
_VLLM_LIMITS = ("head_dim", "sliding_window")


@dataclass(frozen=True)
class Part:
    """One piece of an output tensor: a projection of the parent MLP cut for one expert (-1: the shared expert)."""

    which: str  # gate | up | down
    expert: int


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of an MoE layer: its name relative to the decoder layer and what fills it."""

    name: str
    shape: tuple[int, ...]
    kind: str  # router | buffer | expert | shared
    source: str = "parts"  # parts (concatenated in order) | router | zeros
    parts: tuple[Part, ...] = ()
    dtype: str | None = None  # safetensors code when it is not the output dtype


@dataclass(frozen=True, kw_only=True)
class MoEType:
    model_type: str
    architecture: str
    scoring: str  # "softmax" (then top-k) | "sigmoid" (group-limited, bias for selection) | "topk_softmax"
    routings: tuple[str, ...]  # the routing-weight rules (ROUTINGS) this type can store
    shared: str | None = None  # None | "gated" (one wide expert times sigmoid(gate)) | "plain" (one wide expert)
    dense_layers: str | None = None  # None | "any" (mlp_only_layers) | "prefix" (first_k_dense_replace)
    qkv_bias: str = "config"  # "never" | "always" (zeros written when the parent has none) | "config"
    o_bias: bool = True  # whether attention_bias also puts a bias on o_proj
    qk_norms: tuple[str | None, ...] = (None,)  # parent q/k-norm kinds this type reproduces
    norm_style: str = "pre"
    multipliers: bool = False
    partial_rotary: bool = False
    sliding: str = "none"  # "none" | "uniform" | "layer_types"
    custom_head_dim: bool = True
    moe_prefix: str = "mlp"
    router_key: str = "gate.weight"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_prefix: str | None = None  # relative to the decoder layer
    selection_bias: bool = False  # e_score_correction_bias: shifts which experts are chosen, not their weights
    routed_scale_in_config: bool = False  # routed_scaling_factor multiplies the routed output (exact in bf16)
    whole_groups: bool = False  # expert groups in the config make every token pick whole virtual groups
    vllm_ignores: tuple[str, ...] = ()  # parent features vLLM's implementation of this type drops

    def __post_init__(self):
        checks = [("scoring", self.scoring in SCORINGS), ("shared", self.shared in _SHARED),
                  ("dense_layers", self.dense_layers in _DENSE), ("qkv_bias", self.qkv_bias in _QKV_BIAS),
                  ("qk_norms", bool(self.qk_norms) and set(self.qk_norms) <= set(_QK_NORMS)),
                  ("norm_style", self.norm_style in ("pre", "post")), ("sliding", self.sliding in _SLIDING),
                  ("routings", bool(self.routings) and set(self.routings) <= set(ROUTINGS)),
                  ("vllm_ignores", set(self.vllm_ignores) <= set(_VLLM_LIMITS)),
                  ("shared_prefix", (self.shared is None) == (self.shared_prefix is None)),
                  ("expert_names", len(self.expert_names) == 3)]
        bad = [name for name, ok in checks if not ok]
        if bad:
            raise ValueError(f"MoE type {self.model_type!r}: invalid {', '.join(bad)}")
        # the scoring family limits the rules: softmax over the k chosen logits sums to 1 by construction,
        # a sigmoid router cannot produce softmax weights and vice versa
        allowed = {"topk_softmax": {"renorm"}, "softmax": {"renorm", "softmax"}, "sigmoid": {"renorm", "sigmoid"}}
        if not set(self.routings) <= allowed[self.scoring]:
            raise ValueError(f"MoE type {self.model_type!r}: {self.scoring} scoring cannot store {self.routings}")

    # ------------------------------------------------------------------------------------------ what it can hold

    def supports(self, parent: ParentSpec, recipe: MoEShape, moe_layers: list[int], explain: bool = False):
        """True/False, or with explain=True the list of reasons this type cannot hold parent + recipe exactly."""
        t, p = self.model_type, parent
        why: list[str] = []
        if p.norm_style != self.norm_style:
            why.append(f"{p.model_type} normalises {'after' if p.norm_style == 'post' else 'before'} each block, {t} does not")
        if p.qk_norm not in self.qk_norms:
            have = {None: "no q/k norm", "head": "per-head q/k norms", "full": "full-width q/k norms"}
            why.append(f"the parent has {have[p.qk_norm]}, {t} needs {' or '.join(have[k] for k in self.qk_norms)}")
        if p.qkv_bias and self.qkv_bias == "never":
            why.append(f"the parent has q/k/v biases, {t} has none")
        if p.o_bias and not self.o_bias:
            why.append(f"the parent has an o_proj bias, {t} has none")
        if not self.multipliers and not _default_multipliers(p):
            why.append("the parent's granite multipliers exist only in granitemoe types")
        if p.partial_rotary_factor != 1.0 and not self.partial_rotary:
            why.append(f"the parent rotates {p.partial_rotary_factor:g} of each head, {t} rotates all of it")
        windows = p.sliding_windows
        if windows:
            uniform = len(windows) == 1 and None not in p.layer_windows
            if self.sliding == "none":
                why.append(f"the parent uses sliding-window attention, {t} has none")
            elif self.sliding == "uniform" and not uniform:
                why.append(f"the parent mixes sliding and full attention layers, {t} slides on all or none")
        if not p.has_default_head_dim and not self.custom_head_dim:
            why.append(f"the parent's head_dim {p.head_dim} is not hidden/heads, which {t} assumes")
        if recipe.shared_experts and not self.shared:
            why.append(f"{t} has no shared experts")
        dense = [i for i in range(p.num_layers) if i not in set(moe_layers)]
        if dense:
            if self.dense_layers is None:
                why.append(f"{t} makes every layer MoE (asked for dense layers {format_ranges(dense)})")
            elif self.dense_layers == "prefix" and dense != list(range(len(dense))):
                why.append(f"{t} can keep only the first layers dense (asked for dense layers {format_ranges(dense)})")
        if recipe.routing not in self.routings:
            why.append(f"{t} cannot store --routing {recipe.routing} ({ROUTINGS[recipe.routing]}); "
                       f"it stores --routing {' or '.join(self.routings)}")
        elif recipe.zero_router and recipe.group_size > 1 and not self.whole_groups:
            why.append(f"with a zero router (--router-std 0) every expert ties and {t}'s top-k may split a virtual "
                       f"group of {recipe.group_size} slices; use a positive --router-std (not exact, measured by "
                       f"--verify) or --granularity 1")
        return why if explain else not why

    def portability_notes(self, parent: ParentSpec, recipe: MoEShape) -> list[str]:
        """Runtimes other than transformers that may read this folder differently (shown in --dry-run and the card)."""
        t, notes = self.model_type, []
        if "head_dim" in self.vllm_ignores and not parent.has_default_head_dim:
            notes.append(f"vLLM's {t} ignores head_dim ({parent.head_dim} here)")
        if self.shared and not recipe.shared_experts:
            notes.append(f"{t} always has a shared expert; it is written zero-width, which other runtimes may reject")
        if "sliding_window" in self.vllm_ignores and parent.sliding_windows:
            notes.append(f"vLLM's {t} applies no sliding window")
        return notes

    # ------------------------------------------------------------------------------------------ how it is stored

    @property
    def shared_gate_factor(self) -> float:
        """Factor on the shared expert's down_proj that undoes its gate at the start (qwen2_moe: sigmoid(0) = 0.5)."""
        return 2.0 if self.shared == "gated" else 1.0

    def moe_tensors(self, experts: int, width: int, shared_width: int, hidden: int, has_shared: bool) -> list[TensorSpec]:
        """Every tensor of one MoE layer, in the order they are written (the order fixes the output bytes)."""
        out = self.router_tensors(experts, hidden) + self.expert_tensors(experts, width, hidden)
        if self.shared is not None:
            out += self.shared_tensors(shared_width, hidden, has_shared)
        return out

    def router_tensors(self, experts: int, hidden: int) -> list[TensorSpec]:
        out = [TensorSpec(f"{self.moe_prefix}.{self.router_key}", (experts, hidden), "router", source="router")]
        if self.selection_bias:
            # transformers keeps this buffer in fp32 whatever the model dtype (_keep_in_fp32_modules_strict)
            out.append(TensorSpec(f"{self.moe_prefix}.gate.e_score_correction_bias", (experts,), "buffer",
                                  source="zeros", dtype="F32"))
        return out

    def expert_tensors(self, experts: int, width: int, hidden: int) -> list[TensorSpec]:
        """One gate/up/down triple per expert (a type with fused expert tensors overrides this)."""
        shapes = {"gate": (width, hidden), "up": (width, hidden), "down": (hidden, width)}
        return [TensorSpec(f"{self.moe_prefix}.experts.{e}.{disk}.weight", shapes[which], "expert", parts=(Part(which, e),))
                for e in range(experts) for which, disk in zip(("gate", "up", "down"), self.expert_names)]

    def shared_tensors(self, width: int, hidden: int, present: bool) -> list[TensorSpec]:
        """The shared expert; a type that always builds one gets a zero-width one when none is asked for."""
        out = []
        for which in ("gate", "up", "down"):
            shape = (hidden, width) if which == "down" else (width, hidden)
            out.append(TensorSpec(f"{self.shared_prefix}.{which}_proj.weight", shape, "shared",
                                  parts=(Part(which, -1),) if present else ()))
        return out

    # ------------------------------------------------------------------------------------------ its config.json

    def build_config(self, parent: ParentSpec, recipe: MoEShape, moe_layers: list[int], dtype: str) -> dict:
        """config.json: the keys every type shares (written for transformers 4.x and 5.x at once), then the type's."""
        p = parent
        rope = dict(p.rope_parameters)
        cfg: dict = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "hidden_size": p.hidden_size,
            "num_hidden_layers": p.num_layers,
            "num_attention_heads": p.num_heads,
            "num_key_value_heads": p.num_kv_heads,
            "head_dim": p.head_dim,
            "vocab_size": p.vocab_size,
            "rms_norm_eps": p.rms_norm_eps,
            "hidden_act": p.hidden_act,
            "max_position_embeddings": p.max_position_embeddings,
            "tie_word_embeddings": p.tie_word_embeddings,
            **p.token_ids,
            "attention_dropout": p.attention_dropout,
            "initializer_range": p.initializer_range,
            "use_cache": True,
            "rope_parameters": rope,
            "rope_theta": rope["rope_theta"],
            "rope_scaling": _legacy_rope_scaling(rope),
            "num_experts_per_tok": recipe.top_k,
            "output_router_logits": False,
            "router_aux_loss_coef": 0.01,
            "dtype": dtype,
            "torch_dtype": dtype,
            "transformers_version": _transformers_version(),
        }
        if p.partial_rotary_factor != 1.0 or self.partial_rotary:
            cfg["partial_rotary_factor"] = p.partial_rotary_factor
            rope["partial_rotary_factor"] = p.partial_rotary_factor
        dense = [i for i in range(p.num_layers) if i not in set(moe_layers)]
        cfg.update(self.moe_config(p, recipe, dense))
        return cfg

    def moe_config(self, parent: ParentSpec, recipe: MoEShape, dense: list[int]) -> dict:
        """The type's own config.json keys (experts, widths, routing rule, sliding windows, biases)."""
        raise NotImplementedError(f"{self.model_type} has no config builder")


# ---------------------------------------------------------------------------------------------------- helpers

def expert_width(parent: ParentSpec, recipe: MoEShape) -> int:
    return parent.intermediate_size // recipe.granularity


def sliding(parent: ParentSpec) -> tuple[int | None, list[str], int]:
    """(window, layer_types, max_window_layers): sliding layers as a suffix for 4.x's max_window_layers."""
    windows = parent.layer_windows
    window = next((w for w in windows if w is not None), None)
    types = ["sliding_attention" if w is not None else "full_attention" for w in windows]
    first = next((i for i, w in enumerate(windows) if w is not None), len(windows))
    return window, types, first


def _default_multipliers(p: ParentSpec) -> bool:
    m = p.multipliers
    return not m or (
        m["embedding_multiplier"] == 1.0 and m["residual_multiplier"] == 1.0 and m["logits_scaling"] == 1.0
        and abs(m["attention_multiplier"] - p.head_dim**-0.5) < 1e-12
    )


def _transformers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:  # pragma: no cover - transformers is a dependency
        return "5.0.0"


def _legacy_rope_scaling(rope: dict) -> dict | None:
    if rope.get("rope_type", "default") == "default":
        return None
    return {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
