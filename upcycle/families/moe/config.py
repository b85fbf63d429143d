"""config.json for the MoE checkpoint, written for transformers 4.x and 5.x at once.

transformers 5 reads `rope_parameters`; 4.x reads `rope_theta`/`rope_scaling` and silently falls back to a
default theta without them (logits off by 0.2-1.6, docs/background.md section 3). Likewise 4.57's qwen3_moe wants
`num_experts`, and glm4_moe assumes partial_rotary_factor 0.5 unless told. So every key either generation
reads is written explicitly, and no default of either generation is relied upon.
"""

from __future__ import annotations

from upcycle.families.parents import ParentSpec
from upcycle.families.moe import MoEFormat
from upcycle.convert.recipe import Recipe


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


def _sliding(parent: ParentSpec) -> tuple[int | None, list[str], int]:
    """(window, layer_types, max_window_layers): sliding layers as a suffix for 4.x's max_window_layers."""
    windows = parent.layer_windows
    window = next((w for w in windows if w is not None), None)
    types = ["sliding_attention" if w is not None else "full_attention" for w in windows]
    first = next((i for i, w in enumerate(windows) if w is not None), len(windows))
    return window, types, first


def build_config(fmt: MoEFormat, parent: ParentSpec, recipe: Recipe, moe_layers: list[int], dtype: str) -> dict:
    p = parent
    rope = dict(p.rope_parameters)
    inter = p.intermediate_size
    expert_inter = inter // recipe.granularity
    shared_inter = recipe.shared_experts * expert_inter
    dense = [i for i in range(p.num_layers) if i not in set(moe_layers)]
    window, layer_types, first_sliding = _sliding(p)

    cfg: dict = {
        "architectures": [fmt.architecture],
        "model_type": fmt.model_type,
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
    if p.partial_rotary_factor != 1.0 or fmt.partial_rotary:
        cfg["partial_rotary_factor"] = p.partial_rotary_factor
        rope["partial_rotary_factor"] = p.partial_rotary_factor

    t = fmt.model_type
    if t == "mixtral":
        cfg.update(num_local_experts=recipe.experts, intermediate_size=expert_inter, sliding_window=window,
                   router_jitter_noise=0.0)
    elif t in ("qwen2_moe", "qwen3_moe"):
        cfg.update(num_experts=recipe.experts, moe_intermediate_size=expert_inter, intermediate_size=inter,
                   norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=dense,
                   use_sliding_window=window is not None, sliding_window=window,
                   max_window_layers=first_sliding, layer_types=layer_types)
        if t == "qwen2_moe":
            cfg.update(shared_expert_intermediate_size=shared_inter, qkv_bias=True)
        else:
            cfg.update(num_local_experts=recipe.experts, attention_bias=p.qkv_bias)
    elif t in ("granitemoe", "granitemoeshared"):
        m = p.multipliers or {"embedding_multiplier": 1.0, "residual_multiplier": 1.0, "logits_scaling": 1.0,
                              "attention_multiplier": p.head_dim**-0.5}
        cfg.update(num_local_experts=recipe.experts, intermediate_size=expert_inter, attention_bias=p.qkv_bias, **m)
        if t == "granitemoeshared":
            cfg.update(shared_intermediate_size=shared_inter)
    elif t in ("glm4_moe", "dots1"):
        v = recipe.group_size
        # Groups of tied router rows become the format's own expert groups, so that whole copies are picked
        # structurally; a group of one expert cannot be scored (top-2 within a group), hence one group then.
        n_group, topk_group = (recipe.copies, recipe.groups_per_token) if v > 1 else (1, 1)
        cfg.update(n_routed_experts=recipe.experts, num_local_experts=recipe.experts, moe_intermediate_size=expert_inter,
                   intermediate_size=inter, n_shared_experts=recipe.shared_experts,
                   first_k_dense_replace=len(dense), n_group=n_group, topk_group=topk_group, norm_topk_prob=True,
                   routed_scaling_factor=recipe.routed_down_scale, attention_bias=p.qkv_bias, scoring_func="sigmoid", topk_method="noaux_tc")
        if t == "glm4_moe":
            cfg.update(use_qk_norm=p.qk_norm == "head", num_nextn_predict_layers=0)
        else:
            cfg.update(sliding_window=window, max_window_layers=first_sliding, layer_types=layer_types,
                       use_sliding_window=window is not None)
    elif t == "flex_olmo":
        cfg.update(num_experts=recipe.experts, intermediate_size=expert_inter, norm_topk_prob=True,
                   attention_bias=p.qkv_bias)
    else:  # pragma: no cover - FORMATS and this function are kept in step by the tests
        raise AssertionError(t)
    return cfg
