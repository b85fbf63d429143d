"""granitemoe and granitemoeshared: top-k of the raw logits, then softmax over those k (= renormalised).

Experts are stored fused: input_linear (E, 2I, H) holds [gate; up] per expert, output_linear (E, H, I). The
granite multipliers (embedding, residual, attention, logits) carry over. granitemoeshared adds one plain shared
expert (shared_mlp, fused the same way, no gate).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from upcycle.families.moe.base import MoEType, Part, TensorSpec, expert_width

if TYPE_CHECKING:
    from upcycle.families.moe.shape import MoEShape
    from upcycle.families.parents import ParentSpec


class GraniteMoe(MoEType):
    def moe_config(self, parent: ParentSpec, recipe: MoEShape, dense: list[int]) -> dict:
        m = parent.multipliers or {"embedding_multiplier": 1.0, "residual_multiplier": 1.0, "logits_scaling": 1.0,
                                   "attention_multiplier": parent.head_dim**-0.5}
        return dict(num_local_experts=recipe.experts, intermediate_size=expert_width(parent, recipe),
                    attention_bias=parent.qkv_bias, **m)

    def expert_tensors(self, experts: int, width: int, hidden: int) -> list[TensorSpec]:
        gate_up = tuple(Part(which, e) for e in range(experts) for which in ("gate", "up"))
        down = tuple(Part("down", e) for e in range(experts))
        return [TensorSpec(f"{self.moe_prefix}.input_linear.weight", (experts, 2 * width, hidden), "expert", parts=gate_up),
                TensorSpec(f"{self.moe_prefix}.output_linear.weight", (experts, hidden, width), "expert", parts=down)]


class GraniteMoeShared(GraniteMoe):
    def moe_config(self, parent: ParentSpec, recipe: MoEShape, dense: list[int]) -> dict:
        return {**super().moe_config(parent, recipe, dense),
                "shared_intermediate_size": recipe.shared_experts * expert_width(parent, recipe)}

    def shared_tensors(self, width: int, hidden: int, present: bool) -> list[TensorSpec]:
        gate_up = (Part("gate", -1), Part("up", -1)) if present else ()
        return [TensorSpec(f"{self.shared_prefix}.input_linear.weight", (2 * width, hidden), "shared", parts=gate_up),
                TensorSpec(f"{self.shared_prefix}.output_linear.weight", (hidden, width), "shared",
                           parts=(Part("down", -1),) if present else ())]


_GRANITE = dict(scoring="topk_softmax", routings=("renorm",), multipliers=True, custom_head_dim=False,
                moe_prefix="block_sparse_moe", router_key="router.layer.weight", vllm_ignores=("head_dim",))
GRANITEMOE = GraniteMoe(model_type="granitemoe", architecture="GraniteMoeForCausalLM", **_GRANITE)
GRANITEMOESHARED = GraniteMoeShared(model_type="granitemoeshared", architecture="GraniteMoeSharedForCausalLM",
                                    shared="plain", shared_prefix="shared_mlp", **_GRANITE)

TYPES = (GRANITEMOE, GRANITEMOESHARED)
