"""glm4_moe and dots1, DeepSeek-V3-style routers: a sigmoid score per expert, group-limited top-k.

transformers 5's router (Glm4MoeTopkRouter, Dots1TopkRouter) computes the logits in fp32, chooses on the scores
plus `e_score_correction_bias` among the `topk_group` best of `n_group` expert groups (a group scores the sum of
its two best), and weighs each chosen expert by its un-biased score, divided by the k scores' sum only when
`norm_topk_prob`, times `routed_scaling_factor`. That factor carries the start's scale, so the experts keep the
parent's weights and bf16 stays exact for any scale. Virtual groups of tied router rows become the type's own
expert groups, so a token picks whole groups even when every score ties.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from upcycle.families.moe.base import MoEType, expert_width, sliding

if TYPE_CHECKING:
    from upcycle.families.moe.shape import MoEShape
    from upcycle.families.parents import ParentSpec


class DeepSeekStyle(MoEType):
    def supports(self, parent: ParentSpec, recipe: MoEShape, moe_layers: list[int], explain: bool = False):
        why = super().supports(parent, recipe, moe_layers, explain=True)
        if recipe.group_size == 1 and recipe.experts < 2:  # a group scores its two best experts
            why.append(f"{self.model_type} needs at least 2 routed experts")
        return why if explain else not why

    def moe_config(self, parent: ParentSpec, recipe: MoEShape, dense: list[int]) -> dict:
        v = recipe.group_size
        # a group of one expert cannot be scored (top-2 within a group), hence one group then
        n_group, topk_group = (recipe.copies, recipe.groups_per_token) if v > 1 else (1, 1)
        width = expert_width(parent, recipe)
        return dict(n_routed_experts=recipe.experts, num_local_experts=recipe.experts, moe_intermediate_size=width,
                    intermediate_size=parent.intermediate_size, n_shared_experts=recipe.shared_experts,
                    first_k_dense_replace=len(dense), n_group=n_group, topk_group=topk_group,
                    norm_topk_prob=recipe.routing == "renorm", routed_scaling_factor=recipe.routed_scale,
                    attention_bias=parent.qkv_bias, scoring_func="sigmoid", topk_method="noaux_tc")


class Glm4Moe(DeepSeekStyle):
    def moe_config(self, parent: ParentSpec, recipe: MoEShape, dense: list[int]) -> dict:
        return {**super().moe_config(parent, recipe, dense), "use_qk_norm": parent.qk_norm == "head",
                "num_nextn_predict_layers": 0}


class Dots1(DeepSeekStyle):
    def moe_config(self, parent: ParentSpec, recipe: MoEShape, dense: list[int]) -> dict:
        window, layer_types, first_sliding = sliding(parent)
        return {**super().moe_config(parent, recipe, dense), "sliding_window": window,
                "max_window_layers": first_sliding, "layer_types": layer_types, "use_sliding_window": window is not None}


_DEEPSEEK = dict(scoring="sigmoid", routings=("renorm", "sigmoid"), shared="plain", dense_layers="prefix",
                 shared_prefix="mlp.shared_experts", selection_bias=True, routed_scale_in_config=True, whole_groups=True)
GLM4_MOE = Glm4Moe(model_type="glm4_moe", architecture="Glm4MoeForCausalLM", o_bias=False, qk_norms=(None, "head"),
                   partial_rotary=True, **_DEEPSEEK)
DOTS1 = Dots1(model_type="dots1", architecture="Dots1ForCausalLM", qk_norms=("head",), sliding="layer_types", **_DEEPSEEK)

TYPES = (GLM4_MOE, DOTS1)
