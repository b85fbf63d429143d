"""mixtral (MixtralForCausalLM): softmax, top-k, always renormalised; no shared experts, every layer MoE.

The most widely run MoE type (vLLM, SGLang, llama.cpp), so `--format auto` tries it first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from upcycle.families.moe.base import MoEType, expert_width, sliding

if TYPE_CHECKING:
    from upcycle.families.moe.shape import MoEShape
    from upcycle.families.parents import ParentSpec


class Mixtral(MoEType):
    def moe_config(self, parent: ParentSpec, recipe: MoEShape, dense: list[int]) -> dict:
        window, _, _ = sliding(parent)
        return dict(num_local_experts=recipe.experts, intermediate_size=expert_width(parent, recipe),
                    sliding_window=window, router_jitter_noise=0.0)


MIXTRAL = Mixtral(model_type="mixtral", architecture="MixtralForCausalLM", scoring="softmax", routings=("renorm",),
                  qkv_bias="never", o_bias=False, sliding="uniform", moe_prefix="block_sparse_moe",
                  expert_names=("w1", "w3", "w2"), vllm_ignores=("sliding_window",))

TYPES = (MIXTRAL,)
