"""`--resume` continues exactly: same data order, RNG (router jitter), capacity drops, optimizer and scheduler.

The slow test kills a real `python -m upcycle train` process with SIGKILL as soon as its first checkpoint
appears, resumes it, and compares every step's losses with an uninterrupted run; the fast one resumes in-process
from a run folder cut back to an earlier checkpoint plus a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from upcycle.core.assets import stdlib_dir
from upcycle.convert import convert
from upcycle.core.errors import TrainingError
from upcycle.train import TrainConfig, train
from upcycle.train import checkpoint as ck

DATA = stdlib_dir() / "json"
# Router jitter draws from the RNG and the capacity factor drops tokens: both must come back exactly.
OPTIONS = dict(seq_len=32, batch_size=2, precision="fp32", experts_impl="eager", eval_every=0, router_jitter=0.05,
               capacity_factor=1.0, lr=1e-3, seed=3)


@pytest.fixture(scope="module")
def tiny_moe(tiny_parent, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe") / "m"
    convert(tiny_parent("llama"), out, experts=4, top_k=2, verify=False, quiet=True)
    return out


def cli_args(opts: dict) -> list[str]:
    args = []
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + flag[2:])
        else:
            args += [flag, str(v)]
    return args


def losses(run: Path) -> dict[int, tuple[float, float, float, float]]:
    rows = [json.loads(line) for line in (run / ck.METRICS).read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"steps repeated or out of order: {steps}"
    return {r["step"]: (r["loss"], r["aux_loss"], r["z_loss"], r["grad_norm"]) for r in rows}


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-7), f"step {step}"


def test_resume_in_process_from_an_earlier_checkpoint(tiny_moe, tmp_path):
    """Resuming from checkpoint-2 of a 4-step run (as if killed while writing checkpoint-4) reproduces steps 3
    and 4, and the final weights, exactly."""
    full = tmp_path / "full"
    train(TrainConfig(model=str(tiny_moe), data=[str(DATA)], out=full, steps=4, save_every=2, **OPTIONS))
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for name in ("checkpoint-4", "final"):
        shutil.rmtree(cut / name)
    (cut / ".checkpoint-4.partial").mkdir()  # a checkpoint the kill interrupted
    res = train(TrainConfig(model=str(tiny_moe), data=[str(DATA)], out=cut, steps=4, save_every=2, resume=True,
                            **OPTIONS))
    assert res.steps == 4 and res.tokens == 4 * 64
    assert_same(losses(full), losses(cut))
    from safetensors.torch import load_file

    a, b = load_file(full / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
    run = json.loads((cut / "run.json").read_text())
    assert run["resumes"][0]["step"] == 2
    assert not (cut / ".checkpoint-4.partial").exists()


@pytest.mark.slow  # ~15-30 s: a fresh Python process imports torch and transformers before it trains
def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_moe, tmp_path):
    steps, every = 6, 2
    opts = {**OPTIONS, "steps": steps, "save_every": every}
    full = tmp_path / "full"
    train(TrainConfig(model=str(tiny_moe), data=[str(DATA)], out=full, **opts))

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "upcycle", "train", str(tiny_moe), "-d", str(DATA), "-o", str(run), *cli_args(opts)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / f"checkpoint-{every}").is_dir():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "final").exists(), "the run finished before it could be killed"
    done = max(losses(run))
    assert done < steps
    # the last complete checkpoint is what resume uses; a half-written one (if the kill hit a save) is ignored
    resume_from = ck.checkpoints(run)[-1][0]
    assert resume_from >= every

    res = train(TrainConfig(model=str(tiny_moe), data=[str(DATA)], out=run, resume=True, **opts))
    assert res.steps == steps and (run / "final").is_dir() and not list(run.glob(".*.partial"))
    assert_same(losses(full), losses(run))
    assert json.loads((run / "run.json").read_text())["resumes"][0]["step"] == resume_from

    # resuming a finished run is refused before any compute
    with pytest.raises(TrainingError, match=f"nothing to resume: .* already finished at step {steps} of {steps}"):
        train(TrainConfig(model=str(tiny_moe), data=[str(DATA)], out=run, resume=True, **opts))


def test_resume_refuses_a_changed_data_layout(tiny_moe, tmp_path):
    from upcycle.core.errors import UpcycleError

    run = tmp_path / "r"
    opts = {**OPTIONS, "steps": 2, "save_every": 1}
    train(TrainConfig(model=str(tiny_moe), data=[str(DATA)], out=run, **opts))
    shutil.rmtree(run / "final")
    with pytest.raises(UpcycleError, match="cannot resume the data position: .* differ from the checkpoint's"):
        train(TrainConfig(model=str(tiny_moe), data=[str(DATA)], out=run, resume=True, **{**opts, "seq_len": 16}))
