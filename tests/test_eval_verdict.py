"""The words of `upcycle eval`'s verdict, through the CLI, in each situation a user meets: a fresh (untrained) MoE,
a trained MoE against its parent only, against a dense baseline trained the same way, against a wrong parent, and
against a baseline trained on other tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from upcycle.cli import app
from upcycle.core.assets import stdlib_dir

runner = CliRunner()
SEQ = ["--seq-len", "64", "--max-blocks", "12", "--batch-size", "4", "--no-plots", "--split", "all"]
TRAIN_DATA = stdlib_dir() / "json"


def _eval(*args):
    res = runner.invoke(app, ["eval", *map(str, args), *SEQ])
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split())


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    import sysconfig

    std = Path(sysconfig.get_paths()["stdlib"])
    body = "".join((std / n).read_text(encoding="utf-8") for n in ("bisect.py", "colorsys.py"))[:20000]
    # 40 documents: the paired interval is over documents and needs at least 10 (upcycle.evaluate.stats)
    p = tmp_path_factory.mktemp("data") / "general.jsonl"
    p.write_text("".join(json.dumps({"text": body[i:i + 500]}) + "\n" for i in range(0, len(body), 500)))
    return p


@pytest.fixture(scope="module")
def setup(tiny_parent, tmp_path_factory):
    """parent, fresh MoE, its trained run, the dense baseline run with the same options, a shorter dense run."""
    from upcycle.convert import convert
    from upcycle.train import TrainConfig, train

    parent = tiny_parent("llama")
    root = tmp_path_factory.mktemp("verdict")
    moe = root / "moe"
    convert(parent, moe, experts=4, top_k=2, verify=False, quiet=True)

    def run(model, out, steps):
        train(TrainConfig(model=str(model), data=[str(TRAIN_DATA)], out=out, steps=steps, seq_len=64, batch_size=4,
                          lr=3e-3, warmup_steps=1, save_every=0, precision="fp32", experts_impl="eager",
                          eval_every=0))
        return out

    return {"parent": parent, "moe": moe, "moe_run": run(moe, root / "moe-run", 6),
            "dense_run": run(parent, root / "dense-run", 6), "short_dense": run(parent, root / "dense-short", 3)}


def test_manifest_records_the_parent_and_weights_digests(setup):
    from upcycle.storage.manifest import folder_digest, read_manifest

    m = read_manifest(setup["moe"])
    assert m.parent_digest == folder_digest(setup["parent"]) and len(m.parent_digest) == 64
    assert m.weights_digest == folder_digest(setup["moe"])
    assert folder_digest(setup["moe_run"] / "final") != m.weights_digest  # training changed the weights


def test_untrained_moe_against_its_parent(setup, text, tmp_path):
    said = _eval(setup["moe"], "--parent", setup["parent"], "--data", text, "--out", tmp_path / "r")
    r = _report(tmp_path / "r")
    assert r["verdict"]["kind"] == "untrained" and r["provenance"]["untrained_since_conversion"] is True
    assert r["provenance"]["parent_match"] is True and r["provenance"]["parent_check"] == "tensor digest"
    assert "Untrained since conversion" in said and "cannot have paid off" in said
    assert "same loss as its parent" in said and "paid off:" not in said
    assert r["routers"]["learned"] is False and "untrained" in r["routers"]["text"]


def test_trained_moe_against_the_parent_only(setup, text, tmp_path):
    said = _eval(setup["moe_run"] / "final", "--parent", setup["parent"], "--data", text, "--out", tmp_path / "r")
    r = _report(tmp_path / "r")
    assert r["provenance"]["untrained_since_conversion"] is False and r["provenance"]["parent_match"] is True
    assert r["provenance"]["model_tokens"] == 6 * 4 * 64  # found through RUN/final's run folder
    assert r["comparison"]["verdict"] == "better" and r["verdict"]["kind"] == "better_than_parent"
    assert "Better than the parent: loss" in said
    assert "Not an upcycling claim" in said and "dense baseline trained on the same data and tokens" in said
    assert "paid off" not in said.replace("cannot have paid off", "")
    assert r["routers"]["learned"] in (True, False) and "of log E" in r["routers"]["text"]
    # judged against the run's start (the converted checkpoint), with the thresholds named; levels beside
    assert "measured against the start" in r["routers"]["text"] and "5%" in r["routers"]["text"]
    assert "50%" in r["routers"]["text"] and "load CV" in r["routers"]["text"]
    assert r["routing_change"]["start"] == str(setup["moe"].resolve())


def test_against_a_dense_baseline_trained_the_same_way(setup, text, tmp_path):
    said = _eval(setup["moe_run"] / "final", "--parent", setup["parent"], "--baseline", setup["dense_run"],
                 "--data", text, "--out", tmp_path / "r")
    r = _report(tmp_path / "r")
    prov = r["provenance"]
    assert prov["model_tokens"] == prov["baseline_tokens"] == 6 * 4 * 64 and prov["same_data"] is True
    assert r["baseline"]["path"] == str(setup["dense_run"] / "final") and r["baseline"]["moe"] is False
    bc = r["baseline_comparison"]
    assert bc["loss_diff"]["mean"] == pytest.approx(r["model"]["loss"] - r["baseline"]["loss"], abs=1e-9)
    expected = {"better": ("paid_off", "Upcycling paid off against the dense baseline trained the same way"),
                "worse": ("did_not_pay", "Upcycling did not pay off: the dense baseline trained the same way is better"),
                "no significant difference": ("no_difference", "Upcycling made no significant difference")}
    kind, words = expected[bc["verdict"]]
    assert r["verdict"]["kind"] == kind and words in said
    assert "Not an upcycling claim" not in said
    summary = (tmp_path / "r" / "summary.md").read_text()
    assert "| metric | model | parent | model vs parent | baseline | model vs baseline |" in summary
    assert "training tokens" in summary


def test_wrong_parent_makes_no_claim(setup, text, tmp_path):
    """The issue's case: a fresh MoE against an unrelated random model with the same tokenizer (and other sizes)."""
    from tests.tiny import make_dense_parent

    other = make_dense_parent(tmp_path / "other", "llama", seed=7, hidden_size=32, intermediate_size=64)
    said = _eval(setup["moe"], "--parent", other, "--data", text, "--out", tmp_path / "r")
    r = _report(tmp_path / "r")
    assert r["provenance"]["parent_match"] is False and r["verdict"]["kind"] == "wrong_parent"
    assert f"--parent {other} is not the model this MoE was converted from" in said
    assert "no upcycling claim" in said and "Untrained since conversion" in said
    assert "paid off:" not in said and "Better than the parent" not in said
    assert all(lay["drift"]["reference"] == "mean_expert" for lay in r["routing"]["layers"])
    # the trained MoE against the wrong parent: still no claim
    said = _eval(setup["moe_run"] / "final", "--parent", other, "--data", text, "--out", tmp_path / "r2")
    assert _report(tmp_path / "r2")["verdict"]["kind"] == "wrong_parent" and "no upcycling claim" in said


def test_baseline_on_other_tokens_is_not_a_fair_comparison(setup, text, tmp_path):
    said = _eval(setup["moe_run"] / "final", "--parent", setup["parent"], "--baseline", setup["short_dense"] / "final",
                 "--data", text, "--out", tmp_path / "r")
    r = _report(tmp_path / "r")
    assert r["verdict"]["kind"] == "unfair" and r["provenance"]["baseline_tokens"] == 3 * 4 * 64
    assert "not trained on the same number of tokens (1,536 for the model, 768 for the baseline)" in said
    assert "paid off" not in said
    # the untrained MoE against a baseline: untrained wins over any comparison
    said = _eval(setup["moe"], "--baseline", setup["dense_run"], "--data", text, "--out", tmp_path / "r2")
    assert _report(tmp_path / "r2")["verdict"]["kind"] == "untrained" and "Against the baseline" in said


def test_baseline_errors(setup, text, tmp_path):
    res = runner.invoke(app, ["eval", str(setup["moe"]), "--baseline", str(tmp_path / "nope"), "--data", str(text),
                              "--out", str(tmp_path / "r"), *SEQ])
    assert res.exit_code == 1 and "--baseline: no such file or folder" in " ".join(res.output.split())
