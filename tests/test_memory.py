"""Memory honesty: estimates before loading, one-line refusals, and estimates that match measured peak RSS."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.tiny import one_line
from typer.testing import CliRunner

from upcycle.cli import app
from upcycle.convert import convert
from upcycle.convert.memory import convert_estimate
from upcycle.core import memory
from upcycle.train.memory import train_estimate
from upcycle.core.assets import stdlib_dir

runner = CliRunner()
DATA = stdlib_dir() / "json"


def test_available_memory_is_probed_and_can_be_overridden(monkeypatch):
    have, where = memory.available()
    assert have > 0 and where in ("MemAvailable", "cgroup limit")
    with open("/proc/meminfo") as f:
        meminfo = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert have <= meminfo * 1.1  # never more than the kernel says (cgroup headroom may be less)
    monkeypatch.setenv("UPCYCLE_MEMORY_AVAILABLE", "3GiB")
    assert memory.available() == (3 << 30, "UPCYCLE_MEMORY_AVAILABLE")


def test_estimate_validates_and_refuses_in_one_line():
    with pytest.raises(ValueError):
        memory.Estimate("x", (("weights", -1),))
    est = memory.Estimate("train", (("weights", 3 << 30), ("AdamW states", 6 << 30)), ("--gradient-checkpointing",))
    line = est.refusal(1 << 30, "MemAvailable")
    assert "\n" not in line and "train needs about 9.66 GB" in line and "1.07 GB is available (MemAvailable)" in line
    assert line.endswith("to reduce it: --gradient-checkpointing")


def test_convert_refuses_before_writing(tiny_parent, tmp_path):
    out = tmp_path / "m"
    r = runner.invoke(app, ["convert", str(tiny_parent("llama")), str(out)], env={"COLUMNS": "300", "UPCYCLE_MEMORY_AVAILABLE": "50MB"})
    assert r.exit_code == 1 and "Traceback" not in r.output
    msg = one_line(r.output)
    assert "convert needs about" in msg and "50.00 MB is available (UPCYCLE_MEMORY_AVAILABLE)" in msg and "--no-verify" in msg
    assert not out.exists() and not list(tmp_path.glob(".m.upcycle-partial-*"))


def test_convert_dry_run_shows_the_estimate(tiny_parent):
    r = runner.invoke(app, ["convert", str(tiny_parent("llama")), "unused", "--dry-run"], env={"COLUMNS": "300"})
    assert r.exit_code == 0 and "memory        about" in r.output


def test_whole_model_check_is_skipped_with_a_reason(tiny_parent, tmp_path, monkeypatch):
    from upcycle.convert import run as run_mod

    monkeypatch.setattr(run_mod, "FULL_CHECK_AUTO_BUDGET", 1 << 20)  # as if the models were large
    res = convert(tiny_parent("llama"), tmp_path / "m", quiet=True)
    v = res.verification
    assert v["whole_model"] is None and "whole-model check skipped: it needs about" in v["whole_model_note"]
    assert "--full-check always" in v["whole_model_note"] and v["layers"]
    res = convert(tiny_parent("llama"), tmp_path / "m2", quiet=True, full_check="always")
    assert res.verification["whole_model"]["greedy_total"] > 0


def test_train_dry_run_prints_estimate_and_loads_nothing(tiny_moe, tmp_path, monkeypatch):
    import upcycle.train.model as model

    monkeypatch.setattr(model, "load_for_training", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", str(tiny_moe), "-d", str(DATA), "-o", str(out), "--steps", "2", "--dry-run",
                            "--train", "router,attention", "--precision", "fp32"], env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    text = r.output
    assert "memory     about" in text and "AdamW states" in text
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.startswith("  ")}
    assert "0 of" in lines["experts"] and lines["router"].split()[1] != "0"
    assert not out.exists()


def test_train_refuses_in_one_line_before_loading(tiny_moe, tmp_path, monkeypatch):
    import upcycle.train.model as model

    monkeypatch.setattr(model, "load_for_training", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    r = runner.invoke(app, ["train", str(tiny_moe), "-d", str(DATA), "-o", str(tmp_path / "run"), "--steps", "2",
                            "--precision", "fp32"], env={"COLUMNS": "300", "UPCYCLE_MEMORY_AVAILABLE": "100MB"})
    assert r.exit_code == 1 and "Traceback" not in r.output
    msg = one_line(r.output)
    assert "train needs about" in msg and "AdamW states" in msg and "--gradient-checkpointing" in msg


def _peak_child_rss(args: list[str], tmp_path) -> int:
    """Peak RSS of `python -m upcycle ARGS` in a fresh process, reported by the process itself at exit.

    VmHWM (this address space's high-water mark), not getrusage's ru_maxrss: Linux carries ru_maxrss across
    fork and exec, so a child of a large pytest process would report the parent's peak."""
    report = tmp_path / "peak_rss"
    hwm = "[int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]"
    code = ("import atexit, runpy, sys; "
            f"atexit.register(lambda: open({str(report)!r}, 'w').write(str({hwm}))); "
            f"sys.argv = ['upcycle'] + {args!r}; runpy.run_module('upcycle', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr[-2000:]
    return int(report.read_text()) * 1024


def _train_estimate(model_dir, extra):
    from upcycle.train.config import TrainConfig

    opts = {k: ([v] if k == "train" else v) for k, v in extra.items()}
    cfg = TrainConfig(model=str(model_dir), data=[str(DATA)], out="unused", steps=3, **opts)
    est, _, _ = train_estimate(str(model_dir), cfg, precision=extra.get("precision", "fp32"))
    return est.total


def _measure_train(model_dir, tmp_path, extra: dict) -> tuple[int, int]:
    flags = []
    for k, v in extra.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    args = ["train", str(model_dir), "-d", str(DATA), "-o", str(tmp_path / "run"), "--steps", "3", "--eval-every", "0",
            "--save-every", "0", "--experts-impl", "eager", *flags]
    return _peak_child_rss(args, tmp_path), _train_estimate(model_dir, extra)


def test_train_estimate_matches_peak_rss_on_a_small_model(tiny_parent, tmp_path):
    """A model big enough that weights, AdamW states and activations matter next to the runtime."""
    parent = tiny_parent("llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=4, head_dim=64)
    moe = tmp_path / "moe"
    convert(parent, moe, experts=8, top_k=2, verify=False, quiet=True)
    peak, est = _measure_train(moe, tmp_path, dict(seq_len=256, batch_size=8, precision="fp32"))
    assert abs(est - peak) <= 0.25 * peak, (est, peak)


def test_convert_estimate_covers_measured_peak(tiny_parent, tmp_path):
    parent = tiny_parent("llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=4, head_dim=64)
    peak = _peak_child_rss(["convert", str(parent), str(tmp_path / "m"), "--full-check", "never"], tmp_path)
    from upcycle.storage.parent import open_parent
    from upcycle.convert.recipe import Recipe
    from upcycle.convert.run import build_plan

    ckpt = open_parent(parent)
    plan, _ = build_plan(ckpt, Recipe())
    ckpt.close()
    # as convert runs it: the k-means router pass beside the writer (the parent's source is thread-safe)
    est = convert_estimate(plan, verify=True, router_beside=True).total
    assert abs(est - peak) <= 0.25 * peak, (est, peak)


@pytest.mark.slow
def test_train_estimate_matches_peak_rss_on_smollm2(smollm2_gguf, tmp_path):
    """The real 135M parent upcycled to 8 x top-2 (692M parameters), its routers, attention and norms trained for a
    few steps (training everything would need about 12 GB, more than a shared CI runner should be asked for)."""
    moe = tmp_path / "moe"
    convert(smollm2_gguf, moe, experts=8, top_k=2, verify=False, quiet=True)
    peak, est = _measure_train(moe, tmp_path, dict(seq_len=256, batch_size=4, precision="fp32",
                                                   train="router,attention,norms"))
    assert abs(est - peak) <= 0.25 * peak, (est, peak)
