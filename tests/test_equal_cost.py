"""`upcycle eval` at equal inference cost: an MoE that runs less than its parent per token (a partition) is also
compared with the parent pruned to the same active MLP width, its most used neurons kept.

The verdicts are forced by construction: a parent whose neurons come in cancelling pairs makes the pruned parent
predict the pad token everywhere while a partition that keeps each pair in one expert does not ("better"), and a
partition whose experts are rewritten to predict the pad token everywhere loses to the pruned parent ("worse").
"""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from upcycle.cli import app

runner = CliRunner()
SEQ = ["--seq-len", "64", "--max-blocks", "12", "--batch-size", "4", "--no-plots", "--split", "all"]
PART = dict(experts=4, granularity=4, slice_order="contiguous", quiet=True, full_check="never")


def _docs(path: Path, n: int, size: int, offset: int = 0) -> Path:
    std = Path(sysconfig.get_paths()["stdlib"])
    body = "".join((std / f).read_text(encoding="utf-8") for f in ("bisect.py", "colorsys.py", "keyword.py",
                                                                    "textwrap.py", "shlex.py"))
    path.write_text("".join(json.dumps({"text": body[offset + i * size: offset + (i + 1) * size]}) + "\n"
                            for i in range(n)))
    return path


def _paired_parent(folder: Path, source: Path) -> Path:
    """A copy of `source` whose MLP neurons come in cancelling pairs. Every neuron reads the same row through gate
    and up (so its activation silu(z) * z is never negative and is the same for all); neuron 2j writes
    r + d_j and neuron 2j+1 writes -r, with r the unit output-head row of the pad token (never a target) and d_j
    neuron 2j's old column with r projected out. Each pair adds d_j, as one neuron did, but the "+" neurons have
    the larger down_proj columns, so a reference keeping the most used half keeps every "+" and no "-": its MLPs
    then add 64 times r and the model predicts the pad token everywhere. A contiguous partition keeps each pair in
    one expert, so whatever it routes, the pairs cancel as in the parent."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    f = next(folder.glob("*.safetensors"))
    w = load_file(str(f))
    w["lm_head.weight"] = 4 * w["lm_head.weight"]  # sharper logits: predicting pad everywhere costs many nats
    r = w["lm_head.weight"][258] / w["lm_head.weight"][258].norm()
    for name in list(w):
        if name.endswith("mlp.gate_proj.weight"):
            row = w[name][:1].expand_as(w[name]).contiguous()
            w[name] = row
            w[name.replace("gate_proj", "up_proj")] = row.clone()
        elif name.endswith("mlp.down_proj.weight"):
            d = w[name][:, 0::2]
            d = d - r[:, None] * (r @ d)[None, :]
            out = torch.empty_like(w[name])
            out[:, 0::2], out[:, 1::2] = r[:, None] + d, -r[:, None].expand_as(d)
            w[name] = out
    save_file(w, str(f), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def world(tiny_parent, tmp_path_factory):
    from upcycle.convert import convert

    root = tmp_path_factory.mktemp("equal-cost")
    parent = tiny_parent("llama")
    paired = _paired_parent(root / "paired", parent)
    out = {"parent": parent, "paired": paired, "eval": _docs(root / "eval.jsonl", 40, 300, offset=30_000),
           "few": _docs(root / "few.jsonl", 3, 2000, offset=10_000)}
    sharp = _sharp_parent(root / "sharp", parent)
    for name, p, k in (("k2", parent, 2), ("k4", parent, 4), ("paired_k2", paired, 2), ("sharp_k2", sharp, 2)):
        convert(p, root / name, top_k=k, **PART)
        out[name] = root / name
    out["sharp"] = sharp
    out["damaged"] = _damaged(root / "damaged", out["sharp_k2"])
    return out


def _sharp_parent(folder: Path, source: Path) -> Path:
    """`source` with its output head four times larger: a confident wrong prediction then costs many nats."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    f = next(folder.glob("*.safetensors"))
    w = load_file(str(f))
    w["lm_head.weight"] = 4 * w["lm_head.weight"]
    save_file(w, str(f), metadata={"format": "pt"})
    return folder


def _damaged(folder: Path, source: Path) -> Path:
    """The mixtral partition `source` with every expert made to write the pad token's output-head row: up reads
    what gate reads (so the activation silu(z) * z is never negative) and every down column is that row, so the
    model predicts the pad token (never a target) everywhere."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    f = next(folder.glob("*.safetensors"))
    w = load_file(str(f))
    r = w["lm_head.weight"][258] / w["lm_head.weight"][258].norm()
    for name in list(w):
        if name.endswith(".w1.weight"):
            w[name.replace(".w1.", ".w3.")] = w[name].clone()
        elif name.endswith(".w2.weight"):
            w[name] = r[:, None].expand_as(w[name]).contiguous()
    save_file(w, str(f), metadata={"format": "pt"})
    return folder


def _eval(tmp_path, model, parent, data, *args, code=0):
    out = tmp_path / f"report-{Path(model).name}"
    res = runner.invoke(app, ["eval", str(model), "--parent", str(parent), "--data", str(data), *SEQ, "-o", str(out),
                              "--overwrite", *args], env={"COLUMNS": "400"})
    assert res.exit_code == code, res.output
    said = " ".join(res.output.split())
    return said, json.loads((out / "report.json").read_text()) if code == 0 else None


def _mlp_weights(mlp) -> dict:
    if hasattr(mlp, "gate_up_proj"):  # phi3: gate rows, then up rows
        gate, up = mlp.gate_up_proj.weight.detach().clone().chunk(2, dim=0)
    else:
        gate, up = mlp.gate_proj.weight.detach().clone(), mlp.up_proj.weight.detach().clone()
    return {"gate": gate, "up": up, "down": mlp.down_proj.weight.detach().clone()}


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_the_pruned_reference_keeps_exactly_the_chosen_neurons(tiny_parent, family):
    from transformers import AutoModelForCausalLM

    from upcycle.core.loading import load_tokenizer
    from upcycle.evaluate import equal_cost as eqc

    folder = tiny_parent(family)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    mlps = {i: layer.mlp for i, layer in enumerate(model.model.layers)}
    weights = {i: _mlp_weights(m) for i, m in mlps.items()}
    plan = eqc.EqualCostPlan(0.375, (0, 1), 1.0, 2.0)
    keep = eqc.widths(model, plan)
    assert keep == {0: 48, 1: 48}
    ids = eqc.sample_ids(load_tokenizer(str(folder)), model.config.max_position_embeddings)
    assert ids.shape[1] <= model.config.max_position_embeddings

    # the use score recomputed from each MLP's input: mean |silu(g x) * u x| times the norm of down's column
    inputs: dict[int, list] = {i: [] for i in mlps}
    hooks = [m.register_forward_pre_hook(lambda mod, a, i=i: inputs[i].append(a[0].reshape(-1, a[0].shape[-1])))
             for i, m in mlps.items()]
    with torch.no_grad():
        model(input_ids=torch.from_numpy(ids))
    for h in hooks:
        h.remove()
    use = eqc.sample_use(model, ids, keep, batch_size=2)
    chosen = eqc.chosen_neurons(use, keep)
    for i, w in weights.items():
        x = torch.cat(inputs[i])
        a = torch.nn.functional.silu(x @ w["gate"].T) * (x @ w["up"].T)
        want = (a.abs().mean(0) * w["down"].norm(dim=0)).numpy()
        np.testing.assert_allclose(use[i], want, rtol=1e-9)
        rest = np.setdiff1d(np.arange(want.size), chosen[i])
        assert chosen[i].size == 48 and want[chosen[i]].min() >= want[rest].max()

    eqc.prune_mlps(model, chosen)
    assert model.config.intermediate_size == 48
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, model.config.hidden_size, generator=g, dtype=torch.float64)
    for i, w in weights.items():
        idx = torch.from_numpy(chosen[i])
        want = (torch.nn.functional.silu(x @ w["gate"][idx].T) * (x @ w["up"][idx].T)) @ w["down"][:, idx].T
        with torch.no_grad():
            got = mlps[i](x)
        assert mlps[i].down_proj.weight.shape == (model.config.hidden_size, 48)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_a_partition_at_top_k_equal_to_experts_is_not_cheaper_and_builds_nothing(world, tmp_path, monkeypatch):
    from upcycle.evaluate import equal_cost as eqc
    from upcycle.storage.manifest import read_manifest

    def refuse(*a, **k):
        raise AssertionError("no pruned reference may be built for a model that is not cheaper than its parent")

    monkeypatch.setattr(eqc, "sample_use", refuse)
    monkeypatch.setattr(eqc, "prune_mlps", refuse)
    assert read_manifest(world["k4"]).data["per_token"]["mlp_share"] == 1
    said, r = _eval(tmp_path, world["k4"], world["parent"], world["eval"])
    assert r["equal_cost"] is None
    assert "equal inference cost" not in said and "pruned parent" not in said


def test_whole_copies_are_not_cheaper(tiny_moe):
    from upcycle.evaluate.equal_cost import equal_cost_plan
    from upcycle.storage.manifest import read_manifest

    assert equal_cost_plan(read_manifest(tiny_moe)) is None


def test_a_cheaper_partition_gets_the_block_with_its_flops_share(world, tmp_path):
    said, r = _eval(tmp_path, world["k2"], world["parent"], world["eval"])
    e = r["equal_cost"]
    assert e["mlp_share"] == 0.5 and e["neurons_kept"] == {"0": 64, "1": 64}
    share = e["pruned_parent"]["flops_per_token"] / r["parent"]["flops_per_token"]
    assert e["flops_share"] == pytest.approx(share) and 0.5 < share < 1
    # the pruned parent runs the MoE's active MLP weights; the MoE adds only its routers
    assert r["model"]["flops_per_token"] - e["pruned_parent"]["flops_per_token"] == 2 * 2 * 4 * 64
    assert e["reference"] == f"the parent pruned to the same active MLP width ({share:.0%} of its FLOPs per token)"
    assert e["sample"].startswith("8 standard library sources")
    assert e["comparison"]["documents"] >= 10
    assert e["verdict"]["kind"] in ("better_at_equal_cost", "worse_at_equal_cost", "no_difference_at_equal_cost")
    assert e["verdict"]["text"] in said and "pruned parent" in said  # the line and the table's column
    assert r["verdict"]["kind"] != "not_built"  # the parent verdict is still there, untouched
    assert r["verdict"]["text"] in said


def test_better_at_equal_cost_when_the_pruned_parent_is_worse(world, tmp_path):
    said, r = _eval(tmp_path, world["paired_k2"], world["paired"], world["eval"])
    e = r["equal_cost"]
    assert e["verdict"]["kind"] == "better_at_equal_cost", e["verdict"]["text"]
    assert e["comparison"]["loss_diff"]["ci95"][1] < 0
    assert "Better at equal inference cost than the parent pruned to the same active MLP width (" in said
    assert "of its FLOPs per token; the model:" in said and "95% CI over" in said


def test_worse_at_equal_cost_for_a_damaged_partition(world, tmp_path):
    said, r = _eval(tmp_path, world["damaged"], world["sharp"], world["eval"])
    e = r["equal_cost"]
    assert e["verdict"]["kind"] == "worse_at_equal_cost", e["verdict"]["text"]
    assert e["comparison"]["loss_diff"]["ci95"][0] > 0
    assert "Worse at equal inference cost than the parent pruned to the same active MLP width (" in said


def test_no_verdict_at_equal_cost_with_too_few_documents(world, tmp_path):
    said, r = _eval(tmp_path, world["damaged"], world["sharp"], world["few"])
    e = r["equal_cost"]
    assert e["verdict"]["kind"] == "too_few_documents"
    assert "No verdict at equal inference cost against the parent pruned to the same active MLP width" in said
    assert "from 3 documents, fewer than the 10" in said
    assert "Worse at equal inference cost" not in said


def test_a_parent_that_is_not_the_recorded_one_gets_no_reference(world, tmp_path, monkeypatch):
    from upcycle.evaluate import equal_cost as eqc

    def refuse(*a, **k):
        raise AssertionError("a wrong parent must not be pruned into a reference")

    monkeypatch.setattr(eqc, "sample_use", refuse)
    said, r = _eval(tmp_path, world["k2"], world["paired"], world["eval"])
    assert r["verdict"]["kind"] == "wrong_parent"
    e = r["equal_cost"]
    assert e["pruned_parent"] is None and e["verdict"]["kind"] == "not_built"
    assert "--parent is not the model this MoE was converted from, so pruning it gives no reference of its cost" in said


def test_no_equal_cost_skips_the_reference(world, tmp_path, monkeypatch):
    from upcycle.evaluate import equal_cost as eqc

    def refuse(*a, **k):
        raise AssertionError("--no-equal-cost must not run the parent on the sample")

    monkeypatch.setattr(eqc, "sample_use", refuse)
    said, r = _eval(tmp_path, world["k2"], world["parent"], world["eval"], "--no-equal-cost")
    e = r["equal_cost"]
    assert e["reference"] is None and e["pruned_parent"] is None and e["verdict"]["kind"] == "not_built"
    assert ("No verdict at equal inference cost (the model runs 50% of the parent's MLP per token): not built "
            "(--no-equal-cost).") in said
    res = runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "--no-equal-cost" in res.output


def test_the_memory_estimate_adds_the_pruned_parent(world):
    from upcycle.evaluate.memory import eval_estimate
    from upcycle.storage.counts import parameter_counts

    more = eval_estimate(str(world["k2"]), str(world["parent"]), dtype="float32", batch_tokens=256,
                         equal_cost_share=0.5)
    counts, _ = parameter_counts(str(world["parent"]))
    parent = sum(counts.values())
    mlp = sum(n for name, n in counts.items() if ".mlp." in name)
    # the parent, its float32 MLP copies for drift and the pruned projections at once
    assert dict(more.parts)["weights"] == parent * 4 + mlp * 4 + int(0.5 * mlp * 4)


def test_scoring_the_sample_files_is_noted(world, tmp_path):
    from upcycle.core.sample import default_files

    first = default_files()[0]
    said, r = _eval(tmp_path, world["k2"], world["parent"], first)
    assert any("ranked the parent's neurons on text that --data also holds" in n and str(first) in n
               for n in r["notes"])
