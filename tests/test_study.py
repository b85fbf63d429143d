"""benchmarks/study.py, the dense-vs-upcycled study, end to end in its --quick form (real SmolLM2 parent,
standard-library text, 2 MoE steps): three arms, FLOP-matched dense steps, paired final comparisons."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_study_quick_runs_every_arm(smollm2_gguf, tmp_path):
    out, plot = tmp_path / "study.json", tmp_path / "loss.png"
    # a child process: the study trains a 692M-parameter MoE, and its memory should go with it
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "study.py"), "--work", str(tmp_path / "w"),
                          "--quick", "--json", str(out), "--plot", str(plot)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    d = json.loads(out.read_text())
    ratio = d["cost"]["moe_over_dense_flops"]
    assert 1.4 < ratio < 1.7  # 8x top-2 of SmolLM2-135M: two MLPs per token plus the shared attention and head
    assert d["steps"] == {"moe": 2, "dense": math.ceil(2 * ratio), "dense_same_tokens": 2}
    curves, summary = d["curves"], d["summary"]
    # every arm starts from the same loss: the MoE is an exact copy of the parent
    assert {c[0]["val_loss"] for c in curves.values()} == {summary["start_val_loss"]}
    assert summary["dense_same_tokens"]["tokens"] == summary["moe_final"]["tokens"] == 2 * d["tokens_per_step"]
    assert summary["dense_same_flops"]["train_flops"] >= summary["moe_final"]["train_flops"]
    for key in ("same_tokens", "same_flops"):
        c = summary["paired"][key]
        assert c["blocks"] == 4 and c["ci95"][0] <= c["mean"] <= c["ci95"][1]
        assert c["mean"] == pytest.approx(c["moe_loss"] - c["dense_loss"], abs=1e-9)
    assert plot.stat().st_size > 10_000
    assert "MoE - dense (same FLOPs)" in res.stdout
