"""Parameters and analytic FLOPs per token, for dense models and MoEs alike.

Active parameters per token = all parameters - (E - k) routed experts' worth in every MoE layer (shared experts,
routers and everything else always run). Embeddings are counted, as model cards do.

Forward FLOPs per token (FORMULA below) = 2 x active matmul parameters + attention scores and mixing.
"Matmul parameters" are the 2-D weights a token is multiplied with: projections, experts, routers and the
output head; not the input embedding (a lookup), unless it is tied to the output head, nor norms and biases.
The attention term is 4 x heads x head_dim x context per layer (QK^T and AV, 2 FLOPs per multiply-add), with
context = the evaluation's seq_len, or the sliding window when that is shorter: the full-context upper bound
that Kaplan et al. use, not the causal average (half of it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

FORMULA = ("forward FLOPs/token = 2 x active matmul params (weight matrices incl. routers, experts actually chosen "
           "and lm_head; excl. the embedding lookup, norms, biases) + sum over layers of 4 x heads x head_dim x "
           "context (QK^T and AV; context = seq_len, or the sliding window when shorter)")


@dataclass(frozen=True)
class ExpertGroup:
    """One MoE layer as far as counting goes."""

    num_experts: int
    top_k: int
    params_per_expert: int


@dataclass
class Cost:
    total_params: int
    active_params: int
    active_matmul_params: int
    attention_flops: float
    flops_per_token: float
    seq_len: int

    def to_json(self) -> dict:
        return {**asdict(self), "formula": FORMULA}


def _attention_flops(config, seq_len: int) -> float:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    total = 0.0
    for i in range(layers):
        sliding = bool(window) and (types[i] == "sliding_attention" if types
                                    else getattr(cfg, "use_sliding_window", True))
        ctx = min(seq_len, int(window)) if sliding else seq_len
        total += 4.0 * heads * head_dim * ctx
    return total


def model_cost(model, experts: list[ExpertGroup], seq_len: int) -> Cost:
    params = list(model.named_parameters())
    total = sum(p.numel() for _, p in params)
    inactive = sum((g.num_experts - g.top_k) * g.params_per_expert for g in experts)
    emb_in = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    emb_out = out.weight if out is not None else None
    tied = emb_out is not None and emb_in.data_ptr() == emb_out.data_ptr()
    matmul = 0
    for _, p in params:  # named_parameters() yields a tied tensor once
        if p.dim() < 2:
            continue
        if p is emb_in and not tied:
            continue
        matmul += p.numel()
    active_matmul = matmul - inactive
    attention = _attention_flops(model.config, seq_len)
    return Cost(total_params=total, active_params=total - inactive, active_matmul_params=active_matmul,
                attention_flops=attention, flops_per_token=2.0 * active_matmul + attention, seq_len=seq_len)
