"""qwen2_moe and qwen3_moe: softmax over all experts, top-k, renormalised only with `norm_topk_prob`.

Both keep any layer dense (`mlp_only_layers`). qwen2_moe always has a shared expert scaled by
sigmoid(shared_expert_gate) and q/k/v biases (zeros when the parent has none); qwen3_moe has per-head q/k norms
and no shared expert. transformers 5's router: softmax in fp32 over the logits, top-k, divided by the k
weights' sum when `norm_topk_prob`, so `--routing softmax` is `norm_topk_prob: false`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from upcycle.families.moe.base import MoEType, TensorSpec, expert_width, sliding

if TYPE_CHECKING:
    from upcycle.families.moe.shape import MoEShape
    from upcycle.families.parents import ParentSpec


class Qwen2Moe(MoEType):
    def moe_config(self, parent: ParentSpec, recipe: MoEShape, dense: list[int]) -> dict:
        window, layer_types, first_sliding = sliding(parent)
        width = expert_width(parent, recipe)
        return dict(num_experts=recipe.experts, moe_intermediate_size=width, intermediate_size=parent.intermediate_size,
                    norm_topk_prob=recipe.routing == "renorm", decoder_sparse_step=1, mlp_only_layers=dense,
                    use_sliding_window=window is not None, sliding_window=window, max_window_layers=first_sliding,
                    layer_types=layer_types, shared_expert_intermediate_size=recipe.shared_experts * width, qkv_bias=True)

    def shared_tensors(self, width: int, hidden: int, present: bool) -> list[TensorSpec]:
        # a zero gate: sigmoid(0) = 0.5, undone by shared_gate_factor on the shared down_proj
        return super().shared_tensors(width, hidden, present) + [
            TensorSpec("mlp.shared_expert_gate.weight", (1, hidden), "shared", source="zeros")]


class Qwen3Moe(Qwen2Moe):
    def moe_config(self, parent: ParentSpec, recipe: MoEShape, dense: list[int]) -> dict:
        cfg = super().moe_config(parent, recipe, dense)
        del cfg["shared_expert_intermediate_size"], cfg["qkv_bias"]
        cfg.update(num_local_experts=recipe.experts, attention_bias=parent.qkv_bias)
        return cfg


QWEN2_MOE = Qwen2Moe(model_type="qwen2_moe", architecture="Qwen2MoeForCausalLM", scoring="softmax",
                     routings=("renorm", "softmax"), shared="gated", dense_layers="any", qkv_bias="always", o_bias=False,
                     sliding="layer_types", shared_prefix="mlp.shared_expert", vllm_ignores=("head_dim", "sliding_window"))
QWEN3_MOE = Qwen3Moe(model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM", scoring="softmax",
                     routings=("renorm", "softmax"), dense_layers="any", qk_norms=("head",), sliding="uniform",
                     vllm_ignores=("sliding_window",))

TYPES = (QWEN2_MOE, QWEN3_MOE)
