"""The benchmark scripts' own logic: the experts benchmark's floors on a tiny shape (a smoke run through the real
code path), and how bench_convert reads convert's per-step timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_bench_experts_reports_both_floors(tmp_path):
    out = tmp_path / "b.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_experts.py"), "--quick", "--tokens", "96",
                          "--hidden", "64", "--intermediate", "128", "--impls", "upcycle", "--threads", "1",
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    impls = {(r["layout"], r["dtype"], r["impl"]) for r in rows}
    for layout in ("coarse", "fine"):
        for dtype in ("fp32", "bf16"):
            assert {(layout, dtype, i) for i in ("dense", "upcycle", "mm floor", "ops floor")} <= impls
    assert all(r["ms"] > 0 for r in rows if "ms" in r)


def test_ops_floor_computes_what_the_experts_compute():
    """The ops floor is a floor of the same work: its output and gradients equal the experts module's (fp32)."""
    import torch
    from bench_experts import build, make_inputs, ops_floor_fn

    torch.manual_seed(0)
    _, experts, cfg, (E, k, _) = build("coarse", torch.device("cpu"), 64, 128)
    x, idx, w, gout = make_inputs(96, E, k, 64, torch.device("cpu"))
    step = ops_floor_fn(experts, x, idx, w, gout, bf16=False, hidden=64)
    step()
    out, gx, g1, g2 = step.results
    cfg._experts_implementation = "eager"
    xx = x.detach().requires_grad_()
    ref = experts(xx, idx, w)
    ref.backward(gout)
    torch.testing.assert_close(out[:96], ref, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(gx[:96], xx.grad, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(g1, experts.gate_up_proj.grad, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(g2, experts.down_proj.grad, rtol=1e-4, atol=1e-8)


def test_bench_convert_reads_the_step_timings():
    from bench_convert import phases

    line = ("wrote out: mixtral, 8 experts top-2, \n6.71B params (2.14B active), 13.4 GB in 93.1s (router init "
            "31.0s, write\n 20.1s, verify 38.2s)\nverified (exact): ...")
    assert phases(line) == {"router init": 31.0, "write": 20.1, "verify": 38.2}
    assert phases("wrote out: ... in 0.4s\n") == {}
    line = ("wrote out: mixtral, 8 experts top-2, 13.42 GB in 37.1s (write 16.5s, router init wait 5.1s, verify 14.6s; "
            "beside the \nwriter: router init 22.1s)")
    assert phases(line) == {"write": 16.5, "router init wait": 5.1, "verify": 14.6,
                            "router init beside the writer": 22.1}


def test_train_phases_times_the_real_loop(tiny_moe, tmp_path):
    """A smoke run of benchmarks/train_phases.py on a tiny MoE: every wrapped phase of the loop was seen, the
    router-gradient split among them, and the phases add up to the step (the rest is forward and bookkeeping)."""
    out = tmp_path / "p.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_phases.py"), "--model", str(tiny_moe),
                          "--steps", "3", "--skip", "1", "--seq-len", "32", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(out.read_text())
    phases = got["phases_s"]
    for label in ("backward", "AdamW step", "router-gradient split: router-loss part", "router losses (aux, z)",
                  "forward and the rest"):
        assert label in phases, label
    assert all(v >= 0 for v in phases.values())  # the forward runs inside the step: nothing is counted twice
    assert sum(phases.values()) == pytest.approx(got["step_s"], rel=1e-9)
    assert "| **whole step** |" in res.stdout
