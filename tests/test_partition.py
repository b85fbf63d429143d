"""Partition upcycling: one MLP copy cut into E experts of which a token runs k < E (upcycle.convert.partition).

What must hold whatever the grouping: every neuron in exactly one expert (or the shared one), equal expert sizes,
the same groups for the same seed, all experts together are the parent's MLP exactly (float64), the router's top-k
finds the experts that carry each token's output far above chance, and the held-out loss convert reports is what
transformers computes for the written folder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from upcycle.cli import app
from upcycle.convert import convert
from upcycle.convert.partition import _assign_balanced, balanced_kmeans
from upcycle.convert.weights import rng
from tests.tiny import one_line

ORDERS = ["contiguous", "random", "cluster", "coactivation"]
# the fitted router's top-2 of 4 experts must hold at least this share of each token's true top-2 (by the norm of
# what each expert adds to the output) on the sample it was fitted on; chance is 2/4. Measured on the tiny parents
# here: 0.84 to 0.92 per layer
MIN_AGREEMENT = 0.75


def _moe_neurons(folder):
    """Per MoE layer: each routed expert's parent neurons, and the shared expert's, from the manifest."""
    from upcycle.storage.manifest import _expand

    m = json.loads((folder / "upcycle.json").read_text())
    out = []
    for lay in m["layers"]:
        if lay["moe"]:
            out.append(([_expand(e["neurons"]) for e in lay["experts"]],
                        _expand(lay["shared"]["neurons"]) if "shared" in lay else []))
    return m, out


# ------------------------------------------------------------------------------------------------ balanced k-means

def test_balanced_assignment_respects_capacity_and_keeps_free_choices():
    sim = np.random.default_rng(0).normal(size=(40, 4))
    labels = _assign_balanced(sim, 10)
    assert np.bincount(labels, minlength=4).tolist() == [10, 10, 10, 10]
    # where every point's favourite already has room for all who want it, nobody is moved
    sim = np.eye(4)[np.repeat(np.arange(4), 5)] + 0.01 * np.random.default_rng(1).normal(size=(20, 4))
    assert np.array_equal(_assign_balanced(sim, 5), np.repeat(np.arange(4), 5))


def test_balanced_kmeans_is_balanced_seeded_and_finds_clusters():
    g = np.random.default_rng(0)
    centres = g.normal(size=(4, 16))
    truth = np.repeat(np.arange(4), 32)
    points = centres[truth] + 0.3 * g.normal(size=(128, 16))
    perm = g.permutation(128)
    points, truth = points[perm], truth[perm]
    a = balanced_kmeans(points, 4, rng(7, 0, 5))
    assert np.bincount(a, minlength=4).tolist() == [32] * 4
    assert np.array_equal(a, balanced_kmeans(points, 4, rng(7, 0, 5)))  # same seed, same groups
    # the groups are the planted clusters (up to their names)
    for j in range(4):
        assert len(set(truth[a == j])) == 1
    noise = g.normal(size=(96, 8))
    assert not np.array_equal(balanced_kmeans(noise, 4, rng(1, 0, 5)), balanced_kmeans(noise, 4, rng(2, 0, 5)))
    with pytest.raises(ValueError, match="do not split"):
        balanced_kmeans(noise[:10], 4, rng(1, 0, 5))


# ------------------------------------------------------------------------------------------------ conversions

@pytest.fixture(scope="module")
def partitions(tiny_parent, tmp_path_factory):
    """partitions(order, **kw) -> a converted 4-expert top-2 partition of the tiny llama parent (cached)."""
    cache: dict = {}

    def make(order: str, **kw):
        key = (order, tuple(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"part-{order}") / "m"
            res = convert(tiny_parent("llama"), out, **{"experts": 4, "granularity": 4, "top_k": 2,
                                                        "slice_order": order, "quiet": True, "full_check": "never", **kw})
            cache[key] = (out, res)
        return cache[key]

    return make


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shared", [0, 1])
def test_every_neuron_is_in_exactly_one_expert(partitions, order, shared):
    kw = dict(experts=3, shared_experts=1, format="qwen2_moe") if shared else {}
    out, res = partitions(order, **kw)
    manifest, layers = _moe_neurons(out)
    assert manifest["partition"] and not manifest["exact_by_construction"]
    inter = res.plan.parent.intermediate_size
    for routed, shared_neurons in layers:
        sizes = {len(n) for n in routed}
        assert sizes == {inter // 4}  # balanced: every expert is one quarter
        assert len(shared_neurons) == shared * inter // 4
        every = [i for n in routed for i in n] + list(shared_neurons)
        assert sorted(every) == list(range(inter))


@pytest.mark.parametrize("order", ["cluster", "coactivation"])
def test_groups_follow_the_seed(partitions, order):
    a, _ = _moe_neurons(partitions(order, seed=1)[0])
    b, _ = _moe_neurons(partitions(order, seed=1, verify=False)[0])
    c, _ = _moe_neurons(partitions(order, seed=2)[0])
    assert a["layers"] == b["layers"]
    assert a["layers"] != c["layers"]


def _parent_mlp_and_experts(parent, out, layer: int, fmt):
    """The parent's MLP {gate, up, down} and the written MoE of `layer` as {"router": (E, H), e: {gate, up, down}},
    shared expert under -1, float64, read by the output type's on-disk names."""
    from safetensors.numpy import load_file

    p = load_file(str(parent / "model.safetensors"))
    mlp = {w: torch.from_numpy(p[f"model.layers.{layer}.mlp.{w}_proj.weight"]).double() for w in ("gate", "up", "down")}
    written = {}
    for f in out.glob("*.safetensors"):
        written.update(load_file(str(f)))
    pre = f"model.layers.{layer}."

    def t(name):
        return torch.from_numpy(written[pre + name]).double()

    moe = {"router": t(f"{fmt.moe_prefix}.{fmt.router_key}")}
    e = 0
    while f"{pre}{fmt.moe_prefix}.experts.{e}.{fmt.expert_names[0]}.weight" in written:
        moe[e] = {w: t(f"{fmt.moe_prefix}.experts.{e}.{disk}.weight") for w, disk in zip(("gate", "up", "down"),
                                                                                          fmt.expert_names)}
        e += 1
    if fmt.shared_prefix is not None:
        moe[-1] = {w: t(f"{fmt.shared_prefix}.{w}_proj.weight") for w in ("gate", "up", "down")}
    return mlp, moe


def _run(m, x):
    return (torch.nn.functional.silu(x @ m["gate"].T) * (x @ m["up"].T)) @ m["down"].T


@pytest.mark.parametrize("order", ORDERS)
def test_all_experts_together_are_the_parent_mlp_in_float64(tiny_parent, partitions, order):
    """The partition loses nothing but what routing skips: every routed expert at weight one (its down_proj carries
    the routed scale k) plus the shared expert is the parent's MLP, to float64 roundoff."""
    out, res = partitions(order, experts=3, shared_experts=1, format="qwen2_moe")
    scale = res.plan.recipe.routed_scale
    assert scale == 2.0  # renorm over the k = 2 chosen: each chosen expert's weight is 1/2 at a tie
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for layer in (0, 1):
        mlp, moe = _parent_mlp_and_experts(tiny_parent("llama"), out, layer, res.plan.fmt)
        want = _run(mlp, x)
        got = sum(_run(moe[e], x) for e in range(3)) / scale
        got = got + _run(moe[-1], x) / 2  # qwen2_moe: its shared expert's gate, sigmoid(0), undone by 2
        assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())


@pytest.mark.parametrize("order", ["cluster", "coactivation"])
@pytest.mark.parametrize("fmt", ["mixtral", "glm4_moe"])
def test_top_k_equal_to_experts_is_exact_again(tiny_parent, tmp_path, order, fmt):
    """The same grouping with every expert on (top-k = E) is an exact recipe: verified in float64."""
    res = convert(tiny_parent("llama"), tmp_path / "m", experts=4, granularity=4, top_k=4, slice_order=order,
                  format=fmt, quiet=True, full_check="never")
    v = res.verification
    assert not res.plan.recipe.partition and v["exact_expected"]
    assert v["max_rel_diff"] <= v["function_rtol"]
    neurons = [o.neurons for o in res.plan.layouts[0].experts]
    assert not all(np.array_equal(n, np.arange(n[0], n[0] + n.size)) for n in neurons)  # really regrouped


def _sample_states(parent, res):
    """The parent's MLP input and output at every layer on the partition's own sample (as the fit saw it)."""
    from upcycle.convert.parent_pass import stream_parent
    from upcycle.convert.partition import sample_ids
    from upcycle.storage.parent import open_parent

    ckpt = open_parent(parent)
    try:
        ids, _ = sample_ids(ckpt, None, res.plan)
        states = {}
        stream_parent(ckpt, ids, None, lambda i, x, y: states.__setitem__(i, (x.double(), y.double())),
                      dtype=torch.float32, attention="sdpa")
    finally:
        ckpt.close()
    return states


@pytest.mark.parametrize("order", ["contiguous", "coactivation"])
def test_the_written_router_finds_the_experts_that_carry_each_token(tiny_parent, partitions, order):
    """Recomputed here from the written router and experts: the router's top-2 holds most of each token's true
    top-2 experts (by the norm of what each adds to the output) on the fitted sample, far above chance (1/2), and
    as convert reported."""
    out, res = partitions(order)
    parent = tiny_parent("llama")
    states = _sample_states(parent, res)
    reported = {s["layer"]: s["agreement"] for s in res.plan.grouping.summary()["layers"]}
    for layer in (0, 1):
        x, _ = states[layer]
        _, moe = _parent_mlp_and_experts(parent, out, layer, res.plan.fmt)
        norms = torch.stack([_run(moe[e], x).norm(dim=1) for e in range(4)], dim=1)
        logits = x @ moe["router"].T
        picked = torch.zeros_like(norms, dtype=torch.bool).scatter_(1, logits.topk(2, dim=1).indices, True)
        true = torch.zeros_like(norms, dtype=torch.bool).scatter_(1, norms.topk(2, dim=1).indices, True)
        agreement = float((picked & true).sum()) / (2 * x.shape[0])
        assert agreement >= MIN_AGREEMENT
        assert abs(agreement - reported[layer]) < 0.02


def test_the_shared_expert_holds_the_most_used_neurons(tiny_parent, partitions):
    out, res = partitions("cluster", experts=3, shared_experts=1, format="qwen2_moe")
    parent = tiny_parent("llama")
    states = _sample_states(parent, res)
    _, layers = _moe_neurons(out)
    for layer, (_, shared) in enumerate(layers):
        x, _ = states[layer]
        mlp, _ = _parent_mlp_and_experts(parent, out, layer, res.plan.fmt)
        a = torch.nn.functional.silu(x @ mlp["gate"].T) * (x @ mlp["up"].T)
        use = a.abs().mean(0) * mlp["down"].norm(dim=0)
        others = np.setdiff1d(np.arange(use.numel()), shared)
        assert float(use[shared].min()) >= float(use[others].max()) * (1 - 1e-5)


def test_reported_heldout_loss_is_what_transformers_computes(tiny_parent, partitions):
    """convert's held-out loss (streamed, MoE blocks rebuilt from the written weights) against plain transformers
    on the same ids: the same numbers for the parent and for the written MoE."""
    from upcycle.convert.verify_heldout import heldout_ids
    from upcycle.core.loading import load_causal_lm
    from upcycle.storage.parent import open_parent

    out, res = partitions("coactivation")
    held = res.verification["heldout"]
    ckpt = open_parent(tiny_parent("llama"))
    try:
        ids, _ = heldout_ids(ckpt)
    finally:
        ckpt.close()
    ids = torch.from_numpy(ids)
    with torch.no_grad():
        for which, folder in (("parent_loss", tiny_parent("llama")), ("moe_loss", out)):
            model = load_causal_lm(folder, dtype="float32")
            loss = float(model(input_ids=ids, labels=ids, use_cache=False).loss)
            assert abs(loss - held[which]) < 1e-4, which
    assert held["moe_loss"] != held["parent_loss"] and held["ci95"][0] <= held["diff"] <= held["ci95"][1]


def test_per_token_cost_is_a_fraction_of_the_parent(partitions):
    _, res = partitions("cluster")
    plan = res.plan
    assert plan.mlp_share == 0.5
    p = plan.parent
    mlp = 3 * p.hidden_size * p.intermediate_size
    # two of the four quarter-MLP experts run per token, in each of the two layers; the router adds E x H
    router = 4 * p.hidden_size
    saved = 2 * (mlp // 2 - router) * p.num_layers
    assert plan.parent_flops_per_token - plan.flops_per_token == saved


# ------------------------------------------------------------------------------------------------ the command line

runner = CliRunner()


def test_the_cli_writes_a_partition_and_says_what_it_costs(tiny_parent, tmp_path):
    r = runner.invoke(app, ["convert", str(tiny_parent("llama")), str(tmp_path / "m"), "--experts", "4",
                            "--granularity", "4", "--top-k", "1", "--slice-order", "cluster"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    text = one_line(r.output)
    assert "verified (not exact by design)" in text
    assert "0.25 of the parent's MLP" in text and "Next-token loss on" in text
    assert "fitted router's top-1" in text
    card = (tmp_path / "m" / "README.md").read_text()
    assert "not exact by design" in card and "forward FLOPs" in card


@pytest.mark.parametrize("args,message", [
    (["--experts", "4", "--granularity", "4", "--top-k", "2", "--require-exact"],
     "--require-exact: this recipe is not exact (a partition: each token runs 2 of 4 routed slices"),
    (["--experts", "6", "--granularity", "4", "--top-k", "2"], "or, for an MoE cheaper than its parent that is not "
     "exact by design, a partition of one MLP copy: --experts 4 with --top-k below 4"),
    (["--experts", "4", "--granularity", "4", "--top-k", "2", "--router-init", "kmeans"],
     "--router-init kmeans gives one row per MLP copy"),
    (["--experts", "8", "--top-k", "2", "--router-init", "fit"], "--router-init fit fits one router row per expert"),
    (["--slice-order", "cluster"], "with --granularity 1 there is one slice"),
    (["--experts", "4", "--granularity", "4", "--top-k", "2", "--router-init", "random", "--router-std", "0"],
     "a zero router ties every expert"),
    (["--experts", "2", "--granularity", "2", "--top-k", "1", "--shared-experts", "2"],
     "--shared-experts must be below --granularity 2"),
    (["--slice-order", "spectral"], "choose contiguous, random, cluster, coactivation"),
])
def test_refusals_are_one_line(tiny_parent, tmp_path, args, message):
    r = runner.invoke(app, ["convert", str(tiny_parent("llama")), str(tmp_path / "m"), *args], env={"COLUMNS": "300"})
    assert r.exit_code == 2, r.output
    assert message in one_line(r.output)
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_smollm2_partition(smollm2_gguf, tmp_path):
    """The real parent: 8 experts top-2 from one MLP, clustered: a quarter of the MLP per token, a router that finds
    the carrying experts far above chance, and the held-out loss it costs measured and reported."""
    res = convert(smollm2_gguf, tmp_path / "m", experts=8, granularity=8, top_k=2, slice_order="cluster",
                  quiet=True, full_check="never")
    plan, v = res.plan, res.verification
    assert plan.mlp_share == 0.25 and plan.flops_per_token < 0.75 * plan.parent_flops_per_token
    assert plan.grouping.summary()["mean_agreement"] > 2 * 2 / 8
    held = v["heldout"]
    assert held["tokens"] >= 1000 and held["moe_loss"] > held["parent_loss"]


def test_the_study_replays_one_parent_pass_to_every_arm(tiny_parent, tmp_path):
    """benchmarks/partition_study.py runs convert's sample pass once and replays it: the arms it writes are the
    ones a plain convert writes, byte for byte."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from partition_study import ReplayPass, paired

    from upcycle.storage.manifest import folder_digest

    parent = tiny_parent("llama")
    kw = dict(experts=4, granularity=4, slice_order="coactivation", verify=False, quiet=True)
    with ReplayPass() as replay:
        for k in (1, 2):
            convert(parent, tmp_path / f"replayed-{k}", top_k=k, **kw)
    assert replay.runs == 1
    for k in (1, 2):
        convert(parent, tmp_path / f"plain-{k}", top_k=k, **kw)
        assert folder_digest(tmp_path / f"replayed-{k}") == folder_digest(tmp_path / f"plain-{k}")
    a, b = np.zeros(640), np.r_[np.ones(320), np.zeros(320)]
    d = paired(a, b)
    assert d["mean"] == 0.5 and d["chunks"] == 10 and d["ci95"][0] < 0.5 < d["ci95"][1]
