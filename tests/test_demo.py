"""`upcycle demo`: bad options fail in a line before any work; an unrelated folder is never deleted; the whole
job (real SmolLM2 parent, standard-library text) runs end to end in the slow job."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from upcycle.cli import app

runner = CliRunner()


def test_demo_help_names_the_steps():
    res = runner.invoke(app, ["demo", "--help"])
    assert res.exit_code == 0
    assert "SmolLM2" in res.output and "--steps" in res.output


def test_demo_refuses_top_k_above_experts(tmp_path):
    res = runner.invoke(app, ["demo", str(tmp_path / "d"), "--experts", "4", "--top-k", "5"])
    assert res.exit_code == 2
    assert "--top-k 5 is more than --experts 4" in res.output
    assert not (tmp_path / "d").exists()


def test_demo_never_deletes_a_folder_it_did_not_make(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    res = runner.invoke(app, ["demo", str(mine)])
    assert res.exit_code == 1 and "not empty" in res.output
    res = runner.invoke(app, ["demo", str(mine), "--overwrite"])
    assert res.exit_code == 1 and "not made by upcycle demo" in res.output
    assert (mine / "thesis.tex").read_text() == "precious"


@pytest.mark.slow
def test_demo_end_to_end_on_the_real_parent(smollm2_gguf, tmp_path):
    from upcycle.demo import DemoOptions, run_demo

    out = tmp_path / "demo"
    # 12 evaluation blocks spread over 12 held-out files: a verdict needs at least 10 documents
    summary = run_demo(out, DemoOptions(experts=2, top_k=1, steps=1, seq_len=64, batch_size=1, eval_blocks=12))
    assert set(summary["seconds"]) == {"parent", "convert", "train", "baseline", "eval"}
    for sub in ("parent/config.json", "moe/upcycle.json", "run/metrics.jsonl", "run/final/config.json",
                "baseline-run/final/config.json", "report/report.json", "report/summary.md", "data/heldout_files.txt"):
        assert (out / sub).is_file(), sub
    report = json.loads((out / "report" / "report.json").read_text())
    # the baseline is the dense parent trained on the same tokens; the verdict may only speak of upcycling vs it
    assert report["provenance"]["model_tokens"] == report["provenance"]["baseline_tokens"] == 64
    assert report["provenance"]["parent_match"] is True and report["baseline"]["moe"] is False
    assert report["verdict"]["kind"] in ("paid_off", "did_not_pay", "no_difference")
    assert report["provenance"]["baseline_differences"] is None and report["data"]["documents"] == 12
    assert summary["eval"]["baseline"] == report["baseline"]["loss"]
    # one step at a small learning rate: the MoE is still close to its parent on held-out files
    assert abs(report["model"]["loss"] - report["parent"]["loss"]) < 0.1
    held = (out / "data" / "heldout_files.txt").read_text().split()
    trained = (out / "data" / "train_files.txt").read_text().split()
    assert held and trained and not set(held) & set(trained)


def test_demo_trains_in_fp32_on_a_cpu(monkeypatch):
    """--precision auto: the MoE trains faster and in less memory in fp32 on a CPU, AMX or not."""
    import torch

    from upcycle.demo import demo_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert demo_precision() == "fp32"
