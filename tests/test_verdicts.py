"""Every verdict of `upcycle eval`, forced through the CLI: "paid off", "did not", "no difference", each reason a
verdict is withheld (a baseline not trained the same way, too few documents), "learned" and "not yet".

The per-block losses each model scores are fixed by the test (the real scoring runs, then its losses are replaced
by constructed ones), and the run records are real runs of `upcycle train` edited one setting at a time, so the
outcome is decided by construction, never by how a tiny random model happened to train.
"""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest
from typer.testing import CliRunner

from upcycle.cli import app

runner = CliRunner()
SEQ = ["--seq-len", "64", "--max-blocks", "12", "--batch-size", "4", "--no-plots"]
STEPS, SEQ_LEN, BATCH = 3, 64, 4
TOKENS = STEPS * SEQ_LEN * BATCH


def _docs(path: Path, n: int, size: int, offset: int = 0) -> Path:
    std = Path(sysconfig.get_paths()["stdlib"])
    body = "".join((std / f).read_text(encoding="utf-8") for f in ("bisect.py", "colorsys.py", "keyword.py",
                                                                    "textwrap.py", "shlex.py"))
    path.write_text("".join(json.dumps({"text": body[offset + i * size: offset + (i + 1) * size]}) + "\n"
                            for i in range(n)))
    return path


@pytest.fixture(scope="module")
def world(tiny_parent, tmp_path_factory):
    """A parent, its 4 x top-2 MoE, the MoE trained, the dense parent trained the same way, the parent trained at
    another learning rate, and the text: 40 training documents, 40 evaluation documents, 3 long ones."""
    from upcycle.convert import convert
    from upcycle.train import TrainConfig, train

    root = tmp_path_factory.mktemp("verdicts")
    parent = tiny_parent("llama")
    moe = root / "moe"
    convert(parent, moe, experts=4, top_k=2, verify=False, quiet=True)
    train_data = _docs(root / "train.jsonl", 60, 400)
    eval_data = _docs(root / "eval.jsonl", 40, 300, offset=30_000)
    few = _docs(root / "few.jsonl", 3, 2000, offset=10_000)

    def run(model, name, **kw):
        out = root / name
        train(TrainConfig(model=str(model), data=[str(train_data)], out=out, steps=STEPS, seq_len=SEQ_LEN,
                          batch_size=BATCH, warmup_steps=1, save_every=0, precision="fp32",
                          experts_impl="eager", eval_every=0, **{"lr": 3e-3, **kw}))
        return out

    return {"root": root, "parent": parent, "moe": moe, "eval": eval_data, "few": few, "train_data": train_data,
            "moe_run": run(moe, "moe-run"), "dense_run": run(parent, "dense-run"),
            "dense_lr": run(parent, "dense-lr", lr=1e-7),
            # upcycle demo's pair: the MoE's experts, routers and norms; the dense MLP and norms
            "moe_parts": run(moe, "moe-parts", train=["router", "experts", "norms"]),
            "dense_parts": run(parent, "dense-parts", train=["dense_mlp", "norms"])}


@pytest.fixture
def losses(monkeypatch):
    """losses(model=f, baseline=g, parent=h): each side's per-block losses become f(n) etc. (n blocks)."""
    from upcycle.evaluate import lm

    real, table = lm.score, {}
    names = {"model": "scoring the model", "baseline": "scoring the baseline", "parent": "scoring the parent"}

    def forced(model, blocks, **kw):
        s = real(model, blocks, **kw)
        make = table.get(kw.get("description"))
        if make is not None:
            s.block_loss = [float(x) for x in make(len(s.block_loss))]
        return s

    monkeypatch.setattr(lm, "score", forced)
    return lambda **sides: table.update({names[k]: v for k, v in sides.items()})


def base(n):
    return [2.0 + 0.05 * ((7 * i) % 5) for i in range(n)]


def better(n):  # 0.1 nats lower on every block, with some spread
    return [b - 0.1 + 0.004 * (i % 3 - 1) for i, b in enumerate(base(n))]


def worse(n):
    return [b + 0.1 + 0.004 * (i % 3 - 1) for i, b in enumerate(base(n))]


def level(n):  # +-0.05 alternating: mean 0 over an even number of blocks
    assert n % 2 == 0
    return [b + (0.05 if i % 2 else -0.05) for i, b in enumerate(base(n))]


def _eval(world, tmp_path, model, *args, data=None, code=0):
    out = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
    res = runner.invoke(app, ["eval", str(model), "--data", str(data or world["eval"]), "--split", "all",
                              "--out", str(out), *map(str, args), *SEQ])
    said = " ".join(res.output.split())
    assert res.exit_code == code, said
    return said, (json.loads((out / "report.json").read_text()) if code == 0 else None)


def _copy_run(world, name: str, edit=None, metrics=None) -> Path:
    """A copy of a real run folder with run.json edited by edit(record) and metrics.jsonl rows by metrics(row)."""
    src = world[name]
    dst = world["root"] / f"{name}-edited-{len(list(world['root'].iterdir()))}"
    shutil.copytree(src, dst)
    if edit is not None:
        rec = json.loads((dst / "run.json").read_text())
        edit(rec)
        (dst / "run.json").write_text(json.dumps(rec))
    if metrics is not None:
        rows = [json.loads(x) for x in (dst / "metrics.jsonl").read_text().splitlines() if x.strip()]
        (dst / "metrics.jsonl").write_text("".join(json.dumps(metrics(r) or r) + "\n" for r in rows))
    return dst


# ------------------------------------------------------------------------------------------- upcycling verdicts

@pytest.mark.parametrize("model,kind,words", [
    (better, "paid_off", "Upcycling paid off against the dense baseline trained the same way"),
    (worse, "did_not_pay", "Upcycling did not pay off: the dense baseline trained the same way is better"),
    (level, "no_difference", "Upcycling made no significant difference against the dense baseline"),
])
def test_each_upcycling_verdict_against_the_fair_baseline(world, losses, tmp_path, model, kind, words):
    losses(model=model, baseline=base, parent=base)
    # MODEL and --baseline as run folders (--help's example): their final/ is scored, their run.json compared
    said, r = _eval(world, tmp_path, world["moe_run"], "--parent", world["parent"], "--baseline", world["dense_run"])
    assert r["verdict"]["kind"] == kind and words in said
    assert r["model"]["path"] == str(world["moe_run"] / "final")
    assert r["provenance"]["baseline_differences"] is None and r["provenance"]["same_data"] is True
    bc = r["baseline_comparison"]
    assert bc["interval_over"] == "documents" and bc["documents"] == 12 >= bc["min_documents"]
    assert "95% CI over 12 documents" in said
    assert ("paid off against" in said) == (kind == "paid_off")


def test_too_few_documents_gives_no_verdict(world, losses, tmp_path):
    losses(model=better, baseline=base, parent=base)
    said, r = _eval(world, tmp_path, world["moe_run"] / "final", "--parent", world["parent"], "--baseline",
                    world["dense_run"], data=world["few"])
    assert r["verdict"]["kind"] == "too_few_documents" and r["data"]["documents"] == 3
    assert r["baseline_comparison"]["verdict"] == "too few documents" and r["comparison"]["verdict"] == "too few documents"
    assert "No upcycling verdict against the dense baseline trained the same way" in said
    assert "come from 3 documents, fewer than the 10 an interval over documents needs" in said
    assert "paid off" not in said and "Better than" not in said


def test_the_issues_case_a_baseline_at_another_learning_rate(world, losses, tmp_path):
    """A baseline trained at --lr 1e-7 against an MoE at 3e-3: once 'paid off'; now named and withheld."""
    losses(model=better, baseline=base, parent=base)
    said, r = _eval(world, tmp_path, world["moe_run"] / "final", "--parent", world["parent"], "--baseline",
                    world["dense_lr"])
    assert r["verdict"]["kind"] == "unfair" and "paid off" not in said
    assert "No upcycling verdict, the baseline was not trained the same way as the MoE" in said
    assert "peak learning rate (--lr): 0.003 for the MoE, 1e-07 for the baseline" in said
    assert [d["setting"] for d in r["provenance"]["baseline_differences"]] == ["peak learning rate (--lr)"]


def _set(path: str, value):
    def edit(rec):
        node = rec
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return edit


@pytest.mark.parametrize("edit,setting,words", [
    (_set("warmup_steps", 2), "warmup steps", "warmup steps: 1 for the MoE, 2 for the baseline"),
    (_set("total_steps", 6), "decay length (total steps)", "decay length (total steps): 3 for the MoE, 6"),
    (_set("config.min_lr_ratio", 0.0), "learning-rate floor (--min-lr-ratio)", "0.1 for the MoE, 0 for the baseline"),
    (_set("config.weight_decay", 0.0), "weight decay", "weight decay: 0.1 for the MoE, 0 for the baseline"),
    (_set("config.precision", "bf16"), "precision", "precision: fp32 for the MoE, bf16 for the baseline"),
    (_set("config.mlp_lr_mult", 1.0), "MLP learning-rate multiplier (--mlp-lr-mult)", "0.5 for the MoE, 1 for the"),
    (_set("trainable.attention", 0), "attention (--train)", "attention (--train): trained for the MoE, frozen for"),
    (_set("start.digest", "0" * 64), "parent", "parent: "),
    (_set("config.seed", 1), "seed (--seed: data order and held-out split)", "held-out split): 0 for the MoE, 1 for"),
    (_set("data.identity", "feedfeedfeedfeed"), "data files (names and sizes)", "data files (names and sizes): 1 files"),
    (_set("tokens_per_step", 128), "tokens per optimizer step (batch)", "(batch): 256 for the MoE, 128 for the"),
    (_set("config.lora", ["attention"]), "LoRA (--lora, --lora-rank, --lora-alpha)", "LoRA (--lora, --lora-rank"),
])
def test_each_unfair_baseline_is_named_and_withheld(world, losses, tmp_path, edit, setting, words):
    losses(model=better, baseline=base, parent=base)
    baseline = _copy_run(world, "dense_run", edit)
    said, r = _eval(world, tmp_path, world["moe_run"], "--parent", world["parent"], "--baseline", baseline)
    assert r["verdict"]["kind"] == "unfair" and "paid off" not in said
    assert [d["setting"] for d in r["provenance"]["baseline_differences"]] == [setting]
    assert words in said


def test_an_unedited_copy_of_the_baseline_still_pays_off(world, losses, tmp_path):
    """The control of the test above: copying a run folder changes nothing the comparison reads."""
    losses(model=better, baseline=base, parent=base)
    said, r = _eval(world, tmp_path, world["moe_run"], "--baseline", _copy_run(world, "dense_run"))
    assert r["verdict"]["kind"] == "paid_off", said


def test_parts_trained_are_mapped_across(world, losses, tmp_path):
    """The MoE's experts are the dense model's MLP and its routers have no counterpart: upcycle demo's pair is fair;
    against a baseline that also trained attention and embeddings it is not."""
    losses(model=better, baseline=base, parent=base)
    said, r = _eval(world, tmp_path, world["moe_parts"], "--baseline", world["dense_parts"])
    assert r["verdict"]["kind"] == "paid_off", said
    said, r = _eval(world, tmp_path, world["moe_parts"], "--baseline", world["dense_run"])
    assert r["verdict"]["kind"] == "unfair"
    assert [d["setting"] for d in r["provenance"]["baseline_differences"]] == ["attention (--train)",
                                                                              "embeddings (--train)"]
    assert "attention (--train): frozen for the MoE, trained for the baseline" in said


def test_other_budget_unknown_runs_and_other_starts_are_withheld(world, losses, tmp_path):
    losses(model=better, baseline=base, parent=base)
    # fewer tokens: the checkpoint's trainer state says how many the baseline saw
    shorter = _copy_run(world, "dense_run")
    state = json.loads((shorter / "final" / "trainer_state.json").read_text())
    (shorter / "final" / "trainer_state.json").write_text(json.dumps({**state, "tokens": state["tokens"] // 2}))
    said, r = _eval(world, tmp_path, world["moe_run"], "--baseline", shorter)
    assert r["verdict"]["kind"] == "unfair"
    assert f"not trained on the same number of tokens ({TOKENS:,} for the model, {TOKENS // 2:,} for the" in said
    # a baseline given as a bare model folder: its training is unknown
    said, r = _eval(world, tmp_path, world["moe_run"], "--baseline", world["parent"])
    assert r["verdict"]["kind"] == "unfair" and "training run (run.json)" in said and "not recorded" in said
    assert "pass the run folders" in said
    # an MoE run that did not start from the conversion (continued from a trained MoE)
    moe = _copy_run(world, "moe_run", _set("start.digest", "1" * 64))
    said, r = _eval(world, tmp_path, moe, "--baseline", world["dense_run"])
    assert r["verdict"]["kind"] == "unfair" and "MoE run's start" in said and "not the fresh conversion" in said


def test_runs_of_an_older_upcycle_are_checked_from_what_they_recorded(world, losses, tmp_path):
    """run.json before `start`, `data` and `parameters`: the start models are digested where they still are, the
    data specs resolved, the parts read from --train; what cannot be read withholds the verdict."""
    def old(rec):
        for key in ("start", "data", "parameters"):
            rec.pop(key)
        rec["config"]["expert_lr_mult"] = rec["config"].pop("mlp_lr_mult")

    losses(model=better, baseline=base, parent=base)
    moe, dense = _copy_run(world, "moe_run", old), _copy_run(world, "dense_run", old)
    rec = json.loads((dense / "run.json").read_text())
    rec["config"].pop("expert_lr_mult")  # a dense run of an older upcycle trained its MLP at --lr
    (dense / "run.json").write_text(json.dumps(rec))
    said, r = _eval(world, tmp_path, moe, "--baseline", dense)
    assert r["verdict"]["kind"] == "unfair"
    assert [d["setting"] for d in r["provenance"]["baseline_differences"]] == [
        "MLP learning-rate multiplier (--mlp-lr-mult)"]
    assert "(--mlp-lr-mult): 0.5 for the MoE, 1 for the baseline" in said
    rec["config"]["mlp_lr_mult"] = 0.5
    (dense / "run.json").write_text(json.dumps(rec))
    said, r = _eval(world, tmp_path, moe, "--baseline", dense)
    assert r["verdict"]["kind"] == "paid_off", said
    # the baseline's start is gone: its parent cannot be checked
    rec["config"]["model"] = str(world["root"] / "gone")
    (dense / "run.json").write_text(json.dumps(rec))
    said, r = _eval(world, tmp_path, moe, "--baseline", dense)
    assert r["verdict"]["kind"] == "unfair" and "parent (tensor digest)" in said and "not recorded for the" in said


# --------------------------------------------------------------------------------------------- held-out split

def test_the_split_comes_from_the_run_and_another_is_refused(world, tmp_path):
    run = _copy_run(world, "moe_run", _set("config.seed", 3))
    said, r = _eval(world, tmp_path, run, "--split", "heldout", "--heldout-fraction", "0.01",
                    data=world["train_data"], code=1)  # the run's 1% of 60 documents holds no complete block
    assert "held-out split of" in said and "held-out fraction 0.01" in said
    said, _ = _eval(world, tmp_path, run, "--split", "heldout", "--seed", "5", data=world["train_data"], code=2)
    assert f"--seed 5: the run {run} held out its documents with --seed 3" in said
    assert "would score some of its training documents" in said
    said, _ = _eval(world, tmp_path, run, "--split", "heldout", "--heldout-fraction", "0.5",
                    data=world["train_data"], code=2)
    assert "--heldout-fraction 0.5: the run" in said and "with --heldout-fraction 0.01" in said
    # nothing given: the run's own split, and the report says where it came from
    rec = json.loads((run / "run.json").read_text())
    rec["config"]["heldout_fraction"] = 0.3
    (run / "run.json").write_text(json.dumps(rec))
    said, r = _eval(world, tmp_path, run, "--split", "heldout", data=world["train_data"])
    assert r["data"]["seed"] == 3 and r["data"]["heldout_fraction"] == 0.3
    assert r["data"]["split_from"] == str(run / "run.json")


# --------------------------------------------------------------------------------------------------- routers

def _edit_final(run: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    path = run / "final" / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _constructed_moe_run(world, router_change, share: float | None) -> Path:
    """A run folder whose final/ is the fresh conversion with `router_change` applied to its tensors (so it counts
    as trained), and whose log says the LM loss gave `share` of the router gradient."""
    run = _copy_run(world, "moe_run", metrics=lambda row: {**row, "router_grad_lm_share": share})
    shutil.rmtree(run / "final")
    shutil.copytree(world["moe"], run / "final")
    _edit_final(run, router_change)
    return run


def _negate_routers(t):  # every token's top-2 of 4 becomes its bottom-2: all choices change
    for k in [k for k in t if k.endswith("block_sparse_moe.gate.weight")]:
        t[k] = -t[k]


def _touch_final_norm(t):  # after the last MoE layer: the routing cannot change
    t["model.norm.weight"] = t["model.norm.weight"] * 1.5


@pytest.mark.parametrize("router_change,share,learned,words", [
    (_negate_routers, 0.9, True, "The routers have learned to route, measured against the start"),
    (_negate_routers, 0.2, False, "the router gradient comes mostly from the auxiliary losses"),
    (_touch_final_norm, 0.9, False, "the routing has hardly changed since the start"),
])
def test_learned_is_measured_against_the_start(world, tmp_path, router_change, share, learned, words):
    run = _constructed_moe_run(world, router_change, share)
    said, r = _eval(world, tmp_path, run, "--parent", world["parent"])
    rv, change = r["routers"], r["routing_change"]
    assert r["provenance"]["untrained_since_conversion"] is False
    assert rv["learned"] is learned and words in said, rv["text"]
    assert change["start"] == str(world["moe"].resolve())
    assert change["topk_changed"] == (1.0 if router_change is _negate_routers else 0.0)
    assert change["lm_share"] == pytest.approx(share) and change["lm_share_steps"] == 1
    # the numbers are printed whichever way it goes, with their thresholds
    changed = "100.0% of the held-out tokens' expert choices changed since the start (at or above 5%)"
    assert (changed if router_change is _negate_routers else "0.0% of the held-out tokens' expert choices changed "
            "since the start (below 5%)") in said
    assert f"the LM loss gave {share:.0%} of the router gradient" in said and "50%" in said
    assert change["expert_drift_from_start"] == pytest.approx(0.0, abs=1e-6)  # the experts were not touched
    assert "not moved at 1e-06" in said


def test_learned_cannot_be_told_without_the_start(world, tmp_path):
    run = _constructed_moe_run(world, _negate_routers, 0.9)
    rec = json.loads((run / "run.json").read_text())
    rec["start"]["model"] = rec["config"]["model"] = str(world["root"] / "gone")
    (run / "run.json").write_text(json.dumps(rec))
    said, r = _eval(world, tmp_path, run, "--parent", world["parent"])
    assert r["routers"]["learned"] is None and "Whether the routers learned cannot be measured" in said
    assert "is no longer there" in said and "Levels now: mean router entropy" in said
