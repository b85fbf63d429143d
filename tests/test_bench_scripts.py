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
        assert (layout, "bf16", "cast floor") in impls and (layout, "fp32", "cast floor") not in impls
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


def test_cast_floor_converts_the_bf16_gradients_into_fp32():
    """The bf16 'cast floor' runs the ops floor on bf16 casts of fp32 master weights and hands back fp32 weight
    gradients: the same numbers as the plain bf16 ops floor's gradients, converted."""
    import torch
    from bench_experts import build, make_inputs, ops_floor_fn

    torch.manual_seed(0)
    _, experts, _, (E, k, _) = build("coarse", torch.device("cpu"), 64, 128)
    x, idx, w, gout = make_inputs(96, E, k, 64, torch.device("cpu"))
    plain = ops_floor_fn(experts, x, idx, w, gout, bf16=True, hidden=64)
    cast = ops_floor_fn(experts, x, idx, w, gout, bf16=True, hidden=64, casts=True)
    plain()
    cast()
    for a, b in zip(plain.results, cast.results):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a.float(), rtol=0, atol=0)


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


def _study_json(path: Path, seed: int, mean: float, ci: tuple[float, float], steps: int = 144) -> Path:
    path.write_text(json.dumps({
        "arm": "default", "settings": {"seed": seed, "steps": steps, "lr": 1e-4, "work": f"/w{seed}", "save_every": seed},
        "summary": {"paired": {"same_tokens": {"mean": mean, "ci95": list(ci), "blocks": 64}}}}))
    return path


def test_study_pool_weights_seeds_by_their_intervals(tmp_path):
    """Inverse-variance pooling, worked by hand: each seed's standard error is its half-width over t(0.975, 63)."""
    from study_pool import main, pool
    from upcycle.evaluate.stats import t975

    a = {"mean": -0.002, "ci95": [-0.004, 0.0], "blocks": 64}  # SE 0.002 / t63
    b = {"mean": 0.001, "ci95": [-0.003, 0.005], "blocks": 64}  # SE 0.004 / t63: a quarter of a's weight
    got = pool([a, b])
    t63 = t975(63)
    se_a, se_b = 0.002 / t63, 0.004 / t63
    assert got["mean"] == pytest.approx((-0.002 / se_a**2 + 0.001 / se_b**2) / (1 / se_a**2 + 1 / se_b**2))
    assert got["mean"] == pytest.approx(-0.0014)
    se = (1 / se_a**2 + 1 / se_b**2) ** -0.5
    assert got["ci95"] == pytest.approx([-0.0014 - t975(126) * se, -0.0014 + t975(126) * se])
    assert got["cochran_q"] == pytest.approx(((-0.002 + 0.0014) / se_a) ** 2 + ((0.001 + 0.0014) / se_b) ** 2)
    # two equal seeds: the same mean, the interval about 1/sqrt(2) as wide
    same = pool([a, a])
    assert same["mean"] == pytest.approx(-0.002) and same["cochran_q"] == pytest.approx(0.0)
    assert (same["ci95"][1] - same["ci95"][0]) / 0.004 == pytest.approx(t975(126) / t63 / 2 ** 0.5)

    out = tmp_path / "pooled.json"
    assert main([str(_study_json(tmp_path / "s0.json", 0, -0.0014, (-0.0036, 0.0007))),
                 str(_study_json(tmp_path / "s1.json", 1, -0.0023, (-0.0041, -0.0004))), "--json", str(out)]) == 0
    pooled = json.loads(out.read_text())["comparisons"]["same_tokens"]["pooled"]
    assert pooled["verdict"] == "MoE better" and pooled["seeds"] == 2 and pooled["blocks"] == 128


def test_study_pool_refuses_other_studies(tmp_path, capsys):
    from study_pool import main

    s0 = _study_json(tmp_path / "s0.json", 0, -0.001, (-0.003, 0.001))
    other_budget = _study_json(tmp_path / "s1.json", 1, -0.001, (-0.003, 0.001), steps=96)
    assert main([str(s0), str(other_budget)]) == 2
    assert "differs in steps" in capsys.readouterr().err
    again = _study_json(tmp_path / "s0b.json", 0, -0.001, (-0.003, 0.001))
    assert main([str(s0), str(again)]) == 2
    assert "the same seed twice" in capsys.readouterr().err


def test_bench_train_rounds_take_the_median_of_per_round_ratios():
    """With interleaved rounds, x dense is the median of the ratios within each round (each MoE case against the
    dense case of its own round), not a ratio of medians; times are medians, the peak RSS the largest."""
    from bench_train import _combine

    def run(model, rnd, tps, rss=1.0):
        return {"model": model, "impl": "-" if model == "dense parent" else "upcycle", "precision": "bf16",
                "round": rnd, "tokens_per_s": tps, "step_s": 512 / tps, "step_s_all": [], "losses": [],
                "peak_rss_gb": rss, "load_avg_1min_before": 1.0 + rnd, "load_avg_1min_after": 2.0 + rnd,
                "wall_s": 1.0}

    # the machine speeds up in round 1 and slows down in round 2
    runs = [run("dense parent", 0, 200), run("MoE", 0, 120, 13.0), run("dense parent", 1, 400),
            run("MoE", 1, 200, 13.5), run("dense parent", 2, 100), run("MoE", 2, 30, 12.0)]
    dense, moe = _combine(runs)
    assert dense["x_dense"] == 1.0
    assert moe["x_dense_rounds"] == [0.6, 0.5, 0.3]
    assert moe["x_dense"] == 0.5  # the ratio of the median tokens/s would be 120 / 200 = 0.6
    assert moe["tokens_per_s"] == 120 and moe["peak_rss_gb"] == 13.5
    assert (moe["load_avg_1min_before"], moe["load_avg_1min_after"]) == (1.0, 4.0)
    assert len(moe["rounds"]) == 3


def test_row_quantum_of_reads_only_upcycle_q_names():
    from bench_experts import row_quantum_of

    assert row_quantum_of("upcycle-q8") == 8 and row_quantum_of("upcycle-q0") == 0
    assert [row_quantum_of(n) for n in ("upcycle", "upcycle-whole", "grouped_mm", None)] == [None] * 4
