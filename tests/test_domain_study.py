"""benchmarks/domain_study.py end to end in its --quick form, on a tiny random parent (every arm through the real
CLI: full, domain experts, forced expert, forced + steered router, LoRA, dense)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_domain_experts import changed_experts, weights
from upcycle.train.config import parse_expert_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~2 minutes: seven CLI processes, each importing torch and transformers
def test_domain_study_quick_runs_every_arm(tiny_parent, tmp_path):
    out, work = tmp_path / "study.json", tmp_path / "w"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "domain_study.py"), "--work", str(work),
                          "--parent", str(tiny_parent("llama")), "--experts", "4", "--precision", "fp32", "--quick",
                          "--json", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    d = json.loads(out.read_text())
    rows = d["rows"]
    assert list(rows) == ["start", "moe_full", "moe_domain", "moe_forced", "moe_forced_steer", "moe_lora", "dense_full"]
    for name, r in rows.items():
        if name == "start":
            continue
        assert r["tokens"] == 2 * 2 * 64
        assert r["gain"] == pytest.approx(rows["start"]["domain_loss"] - r["domain_loss"])
        assert r["forgot"] == pytest.approx(r["general_loss"] - rows["start"]["general_loss"])
        assert ("target_share" in r) == name.startswith("moe")
    # the forced arm changed exactly the forced expert of each layer; the LoRA arm trained adapters only
    moe = Path(d["moe"])
    forced = parse_expert_spec(d["forced"], "x")
    experts, others = changed_experts(weights(moe), weights(work / "quick-run-moe_forced" / "final"))
    assert experts == {(lay, forced.experts_for(lay)[0]) for lay in (0, 1)} and not others
    assert set(rows["moe_lora"]["trainable"]) == {"lora"} and rows["moe_lora"]["lr"] == pytest.approx(1e-3)
    steered = json.loads((work / "quick-run-moe_forced_steer" / "run.json").read_text())["config"]
    assert steered["route_target"] == steered["force_route"] == d["forced"]
    assert torch.isfinite(torch.tensor([r["domain_loss"] for r in rows.values()])).all()
    assert "| moe_forced_steer |" in res.stdout
