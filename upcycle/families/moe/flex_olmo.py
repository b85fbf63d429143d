"""flex_olmo (FlexOlmoForCausalLM): OLMo 2's post-norm blocks and full-width q/k norms, with a qwen-style router.

The router is softmax over all experts, top-k, renormalised only with `norm_topk_prob` (transformers 5's
FlexOlmoTopKRouter), so it stores `--routing softmax` too. Every layer is MoE, no shared experts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from upcycle.families.moe.base import MoEType, expert_width

if TYPE_CHECKING:
    from upcycle.families.moe.shape import MoEShape
    from upcycle.families.parents import ParentSpec


class FlexOlmo(MoEType):
    def moe_config(self, parent: ParentSpec, recipe: MoEShape, dense: list[int]) -> dict:
        return dict(num_experts=recipe.experts, intermediate_size=expert_width(parent, recipe),
                    norm_topk_prob=recipe.routing == "renorm", attention_bias=parent.qkv_bias)


FLEX_OLMO = FlexOlmo(model_type="flex_olmo", architecture="FlexOlmoForCausalLM", scoring="softmax",
                     routings=("renorm", "softmax"), qk_norms=("full",), norm_style="post")

TYPES = (FLEX_OLMO,)
