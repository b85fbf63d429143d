"""upcycle eval's statistics checked against hand-computed values on small constructed tensors."""

from __future__ import annotations

import math

import pytest
import torch

from upcycle.evaluate.routing_stats import RoutingAccumulator
from upcycle.evaluate.specialise import TokenRouting, domain_ranking, experts_file
from upcycle.evaluate.stats import mean_ci, paired_comparison, perplexity, t975

# Four tokens in two sequences of two, E = 4 experts, top-2:
#   seq 0: t0 -> {0, 1}, t1 -> {0, 1};  seq 1: t2 -> {0, 2}, t3 -> {0, 3}
INDICES = torch.tensor([[0, 1], [1, 0], [0, 2], [3, 0]])
P = torch.tensor([0.4, 0.3, 0.2, 0.1])


def test_t_quantiles_table_and_interpolation():
    assert t975(1) == 12.706
    assert t975(30) == 2.042
    assert t975(50) == pytest.approx(2.0086, abs=5e-4)  # exact value 2.00856
    assert t975(1000) == pytest.approx(1.9623, abs=5e-4)  # exact value 1.96234


def test_mean_ci_and_perplexity():
    est = mean_ci([1.0, 2.0, 3.0, 4.0])
    half = 3.182 * math.sqrt(5 / 3) / 2  # t_{0.975,3} * s / sqrt(n)
    assert est.mean == 2.5
    assert (est.low, est.high) == (pytest.approx(2.5 - half), pytest.approx(2.5 + half))
    ppl = perplexity(est)
    assert ppl.mean == pytest.approx(math.exp(2.5))
    assert ppl.low == pytest.approx(math.exp(2.5 - half))
    one = mean_ci([0.7])
    assert one.low is None and one.std is None


def test_paired_comparison_verdicts():
    parent = [2.0, 2.5, 3.0, 3.5]
    same = paired_comparison([x + 1e-7 for x in parent], parent, tolerance=1e-4)
    assert same.verdict == "same" and same.max_abs_diff == pytest.approx(1e-7, rel=1e-3)
    better = paired_comparison([x - 0.1 + d for x, d in zip(parent, [0.01, -0.01, 0.02, -0.02])], parent, 1e-4)
    assert better.verdict == "better"
    assert better.diff.mean == pytest.approx(-0.1)
    assert better.perplexity_ratio == pytest.approx(math.exp(-0.1))
    worse = paired_comparison([x + 0.1 + d for x, d in zip(parent, [0.01, -0.01, 0.02, -0.02])], parent, 1e-4)
    assert worse.verdict == "worse"
    unclear = paired_comparison([x + d for x, d in zip(parent, [0.3, -0.3, 0.2, -0.1])], parent, 1e-4)
    assert unclear.verdict == "no significant difference"


def test_routing_statistics_golden():
    acc = RoutingAccumulator(layer=3, num_experts=4, top_k=2)
    logits = P.log().expand(4, 4)
    acc.update(INDICES[:2], logits[:2], seq_len=2)  # two forwards, one sequence each
    acc.update(INDICES[2:], logits[2:], seq_len=2)
    r = acc.result()
    assert r.tokens == 4
    assert r.load == pytest.approx([0.5, 0.25, 0.125, 0.125])
    # population std of the load over its mean 1/4
    assert r.cv == pytest.approx(math.sqrt((0.25**2 + 0 + 2 * 0.125**2) / 4) / 0.25)
    assert r.max_over_min == pytest.approx(4.0) and r.dead_experts == []
    # capacity 1.0: ceil(2 tokens * 2 / 4) = 1 per expert and sequence; seq 0 overflows experts 0 and 1 by one,
    # seq 1 expert 0 by one: 3 of 8 assignments. 1.25: capacity 2, nothing dropped.
    assert r.drop_at == {"1": pytest.approx(3 / 8), "1.25": 0.0}
    # entropy of the load: 1.75 bits out of 2
    assert r.load_entropy_norm == pytest.approx(0.875)
    h = -float((P * P.log()).sum())
    assert r.entropy == pytest.approx(h, rel=1e-6)
    assert r.entropy_norm == pytest.approx(h / math.log(4), rel=1e-6)
    assert r.mean_prob == pytest.approx(P.tolist(), rel=1e-6)
    assert r.balance_loss == pytest.approx(4 * (0.5 * 0.4 + 0.25 * 0.3 + 0.125 * 0.2 + 0.125 * 0.1), rel=1e-6)
    pairs = torch.tensor(r.pairs)
    assert pairs[0, 1] == 0.5 and pairs[1, 0] == 0.5 and pairs[0, 2] == 0.25 and pairs[2, 3] == 0
    assert torch.diagonal(pairs).tolist() == [1.0, 0.5, 0.25, 0.25]
    assert r.top_pairs[0] == {"experts": [0, 1], "share": 0.5, "lift": 1.0, "jaccard": 0.5}
    assert r.always_together == []
    acc = RoutingAccumulator(0, num_experts=4, top_k=2)
    acc.update(torch.tensor([[0, 1], [1, 0], [2, 3], [0, 1]]))  # 0 and 1 always together, 2 and 3 too
    assert acc.result().always_together == [[0, 1], [2, 3]]


def test_routing_capacity_over_all_tokens_and_dead_expert():
    acc = RoutingAccumulator(0, num_experts=4, top_k=1)
    acc.update(torch.tensor([[0], [0], [0], [1]]))  # one sequence of 4: capacity ceil(4/4) = 1
    r = acc.result()
    assert r.drop_at["1"] == pytest.approx(2 / 4)
    assert r.drop_at["1.25"] == pytest.approx(1 / 4)  # capacity ceil(1.25) = 2
    assert r.dead_experts == [2, 3] and r.max_over_min is None and r.min_load == 0
    assert r.entropy is None and r.balance_loss is None  # no logits given


def test_sigmoid_router_entropy():
    acc = RoutingAccumulator(0, num_experts=4, top_k=2, scoring="sigmoid")
    acc.update(INDICES, torch.zeros(4, 4))
    assert acc.result().entropy_norm == pytest.approx(1.0)


def test_routing_rejects_tokens_that_do_not_split_into_sequences():
    with pytest.raises(ValueError, match="sequences"):
        RoutingAccumulator(0, 4, 2).update(INDICES[:3], seq_len=2)


def test_token_routing_shares_lifts_and_contexts():
    # vocab 5, 2 experts, top-1. token 1 -> e0, e0, e1; token 2 -> e1, e1; token 3 -> e0
    tokens = torch.tensor([1, 1, 1, 2, 2, 3])
    idx = torch.tensor([[0], [0], [1], [1], [1], [0]])
    # router probabilities: expert 0 is most sure at position 5, expert 1 at position 3
    p0 = torch.tensor([0.6, 0.7, 0.4, 0.2, 0.3, 0.9])
    logits = torch.stack([p0, 1 - p0], 1).log()
    tr = TokenRouting(layer=1, num_experts=2, vocab_size=5, contexts=1)
    tr.update(tokens[:3], idx[:3], logits[:3], first_position=0)
    tr.update(tokens[3:], idx[3:], logits[3:], first_position=3)
    blocks = tokens.view(2, 3)
    spec = tr.profiles([0.5, 0.5], top_k=1, decode=lambda ids: "".join(chr(ord("a") + i) for i in ids),
                       blocks=blocks, min_count=2)
    e0, e1 = spec.experts
    assert [(t["id"], t["count"]) for t in e0.top_tokens] == [(1, 2)]  # token 3 was seen once: below min_count
    assert e0.top_tokens[0]["share"] == pytest.approx(2 / 3)
    assert e0.top_tokens[0]["lift"] == pytest.approx((2 / 3) / 0.5)
    assert [(t["id"], t["count"]) for t in e1.top_tokens] == [(2, 2), (1, 1)]
    assert e1.top_tokens[0]["lift"] == pytest.approx(2.0)
    # expert 0's best context is position 5 (block 1, index 2): "cc" before it, "d" marked
    assert e0.contexts == [{"text": "cc[[d]]", "token": "d", "prob": pytest.approx(0.9)}]
    assert e1.contexts[0]["text"] == "[[c]]cd" and e1.contexts[0]["prob"] == pytest.approx(0.8)


def test_domain_ranking_and_experts_file():
    d = domain_ranking(4, general_load=[0.5, 0.25, 0.25, 0.0], domain_load=[0.25, 0.25, 0.4, 0.1], top=2)
    assert d.ratio == [0.5, 1.0, pytest.approx(1.6), math.inf]
    assert d.ranking == [3, 2, 1, 0]
    assert d.selected == [2, 3]
    none = domain_ranking(5, [0.5, 0.5], [0.5, 0.5], top=2)
    assert none.selected == []
    assert experts_file([d, none]) == {"4": [2, 3]}
