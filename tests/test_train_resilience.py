"""Training that survives what machines do to it, through the CLI with real files: a damaged newest checkpoint
(truncated, checksums deleted, a byte changed), a truncated model folder given to train or eval, SIGTERM and
SIGINT mid-run (real signals, in-process and to a subprocess), and a disk too small for the next checkpoint
(simulated through shutil.disk_usage everywhere; a real small tmpfs where this machine lets the test mount one).
Every case is one line of output and an exit code, never a traceback; every resume reproduces the uninterrupted
run's losses."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.test_train_resume import DATA, OPTIONS, assert_same, cli_args, losses
from tests.tiny import one_line
from upcycle.cli import app
from upcycle.core.integrity import CHECKSUMS, checksum_problem
from upcycle.train import TrainConfig, train
from upcycle.train import checkpoint as ck

runner = CliRunner()


def cli(*args) -> tuple[int, list[str]]:
    """(exit code, non-empty output lines with rich's wrapping undone)."""
    r = runner.invoke(app, ["train", *map(str, args)], env={"COLUMNS": "250"})
    assert "Traceback" not in r.output, r.output
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, [one_line(line) for line in r.output.splitlines()
                         if line.strip() and not line.startswith("training ")]  # the progress bar


def train_cli(model, out, steps, every, *extra):
    return cli(model, "-d", DATA, "-o", out, *cli_args({**OPTIONS, "steps": steps, "save_every": every}), *extra)


@pytest.fixture(scope="module")
def full(tiny_moe, tmp_path_factory):
    """An uninterrupted 4-step run with checkpoints at 2 and 4: the reference every resume must reproduce."""
    out = tmp_path_factory.mktemp("full") / "run"
    train(TrainConfig(model=str(tiny_moe), data=[str(DATA)], out=out, steps=4, save_every=2, **OPTIONS))
    return out


def _copy_without_final(full: Path, dst: Path) -> Path:
    shutil.copytree(full, dst)
    shutil.rmtree(dst / "final")
    return dst


def _damage(ckpt: Path, kind: str) -> str:
    """Damage a checkpoint; return what the warning must say about it."""
    if kind == "truncated":
        p = ckpt / "model.safetensors"
        size = p.stat().st_size
        os.truncate(p, size // 2)
        return f"model.safetensors has {size // 2} bytes, {CHECKSUMS} recorded {size}"
    if kind == "no_checksums":
        (ckpt / CHECKSUMS).unlink()
        return f"no {CHECKSUMS}, which is written last: unfinished, or written by an older upcycle"
    if kind == "changed_byte":
        p = ckpt / "trainer" / "optimizer.bin"
        with open(p, "r+b") as f:  # same size, one byte different: only the hash sees it
            f.seek(p.stat().st_size // 2)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0xFF]))
        return "trainer/optimizer.bin does not match its recorded xxh3_64 hash"
    if kind == "missing_state":
        (ckpt / ck.STATE_FILE).unlink()
        return f"{ck.STATE_FILE} is missing"
    raise AssertionError(kind)


# ------------------------------------------------------------------------------------------- damaged checkpoints

@pytest.mark.parametrize("kind", ["truncated", "no_checksums", "changed_byte", "missing_state"])
def test_damaged_newest_checkpoint_resumes_from_the_one_before(tiny_moe, full, tmp_path, kind):
    run = _copy_without_final(full, tmp_path / "run")
    said = _damage(run / "checkpoint-4", kind)
    code, lines = train_cli(tiny_moe, run, 4, 2, "--resume")
    assert code == 0, lines
    warnings = [line for line in lines if line.startswith("warning:")]
    assert warnings == [f"warning: checkpoint-4 is damaged ({said}); resuming from checkpoint-2, 2 steps back "
                        "(checkpoint-4 set aside as checkpoint-4.damaged)"], lines
    assert_same(losses(full), losses(run))
    from safetensors.torch import load_file

    a, b = load_file(full / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert (run / "checkpoint-4.damaged").is_dir()  # kept for the user, never resumed from again
    assert checksum_problem(run / "checkpoint-4", hashes=True) is None  # written again by the resumed run
    assert json.loads((run / "run.json").read_text())["resumes"][0]["step"] == 2


def test_no_intact_checkpoint_is_one_line(tiny_moe, full, tmp_path, monkeypatch):
    import upcycle.train.model as model

    monkeypatch.setattr(model, "load_for_training", lambda *a, **k: pytest.fail("weights were loaded"))
    run = _copy_without_final(full, tmp_path / "run")
    first = _damage(run / "checkpoint-4", "truncated")
    second = _damage(run / "checkpoint-2", "no_checksums")
    code, lines = train_cli(tiny_moe, run, 4, 2, "--resume")
    assert code == 1
    assert lines == [f"error: nothing to resume: no intact checkpoint in {run} (checkpoint-4: {first}; "
                     f"checkpoint-2: {second})"]
    assert (run / "checkpoint-4").is_dir() and not (run / "checkpoint-4.damaged").exists()  # nothing moved


def test_checkpoints_and_final_carry_checksums(full):
    for name in ("checkpoint-2", "checkpoint-4", "final"):
        files = json.loads((full / name / CHECKSUMS).read_text())["files"]
        on_disk = sorted(p.relative_to(full / name).as_posix() for p in (full / name).rglob("*")
                         if p.is_file() and p.name != CHECKSUMS)
        assert sorted(files) == on_disk
        assert all(files[f]["size"] == (full / name / f).stat().st_size for f in files)
        assert checksum_problem(full / name, hashes=True) is None


def test_truncated_model_folder_is_one_line_for_train_and_eval(tiny_moe, full, tmp_path):
    """A model folder cut short while copied: its safetensors header promises more bytes than the file has."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_moe, bad)
    p = bad / "model.safetensors"
    size = p.stat().st_size
    os.truncate(p, size - 1000)
    code, lines = train_cli(bad, tmp_path / "run", 2, 0)
    assert code == 1 and lines == [f"error: {bad} is damaged: model.safetensors is truncated: its header promises "
                                   f"{size} bytes, the file has {size - 1000}"], lines
    assert not (tmp_path / "run").exists()

    # a trained model folder (final/ has checksums.json) with bytes appended: its header alone looks fine
    final = tmp_path / "final"
    shutil.copytree(full / "final", final)
    with open(final / "model.safetensors", "ab") as f:
        f.write(b"\0" * 64)
    size = (full / "final" / "model.safetensors").stat().st_size
    for args in (["eval", final, "-d", DATA, "--seq-len", "32", "--max-blocks", "2", "--split", "all",
                  "-o", tmp_path / "rep"],
                 ["train", final, "-d", DATA, "-o", tmp_path / "run2", "--steps", "1"]):
        r = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        errors = [one_line(line) for line in r.output.splitlines() if line.startswith("error:")]
        assert errors == [f"error: {final} is damaged: model.safetensors has {size + 64} bytes, "
                          f"{CHECKSUMS} recorded {size}"], r.output
        assert r.output.rstrip().endswith(f"recorded {size}")  # nothing after it

    # a README edited by hand is not damage: loading checks the weights' recorded sizes only
    from upcycle.core.integrity import check_model_folder

    edited = tmp_path / "edited"
    shutil.copytree(full / "final", edited)
    (edited / "README.md").write_text("my notes on this model\n")
    check_model_folder(edited)
    assert "README.md has" in checksum_problem(edited, hashes=False)  # while a checkpoint would count it


# ---------------------------------------------------------------------------------------------------- signals

@pytest.mark.parametrize(("sig", "at_step", "code"), [(signal.SIGTERM, 2, 143), (signal.SIGINT, 4, 130)])
def test_signal_saves_the_step_and_resume_matches(tiny_moe, tmp_path, monkeypatch, sig, at_step, code):
    """A real signal to this process while step `at_step` is logged: the step completes, its checkpoint is written
    (at step 4 the regular checkpoint is the one: not written twice), the command exits 128 + the signal, and
    --resume continues with an uninterrupted run's losses."""
    reference = tmp_path / "full"
    train(TrainConfig(model=str(tiny_moe), data=[str(DATA)], out=reference, steps=6, save_every=4, **OPTIONS))

    write = ck.MetricsLog.write

    def write_then_signal(self, row):
        write(self, row)
        if row["step"] == at_step:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(ck.MetricsLog, "write", write_then_signal)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    run = tmp_path / "run"
    got, lines = train_cli(tiny_moe, run, 6, 4)
    assert got == code, lines
    assert lines[-1] == (f"error: stopped by {sig.name} after step {at_step} of 6; checkpoint written to "
                         f"{run / f'checkpoint-{at_step}'} (--resume continues from it)"), lines
    assert [s for s, _ in ck.checkpoints(run)] == [at_step] and not (run / "final").exists()
    assert checksum_problem(run / f"checkpoint-{at_step}", hashes=True) is None
    assert max(losses(run)) == at_step
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored

    monkeypatch.setattr(ck.MetricsLog, "write", write)
    got, lines = train_cli(tiny_moe, run, 6, 4, "--resume")
    assert got == 0, lines
    assert_same(losses(reference), losses(run))


def test_a_second_signal_ends_the_process_at_once(tmp_path):
    """The first signal only asks; a second one is obeyed as if no handler were installed, unless it follows the
    first at once (a launcher forwarding the same request: torchrun sends SIGTERM to workers that got it already)."""
    code = ("import os, signal, time\n"
            "from upcycle.train.signals import DUPLICATE_S, StopOnSignal\n"
            "with StopOnSignal() as stop:\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    assert stop.requested and stop.name == 'SIGINT'\n"
            "    print('asked once', flush=True)\n"
            "    time.sleep(DUPLICATE_S + 0.2)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(30)\n"
            "    print('survived', flush=True)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert proc.stdout == "asked once\n"


@pytest.mark.slow  # ~15-30 s: a fresh Python process imports torch and transformers before it trains
def test_sigterm_to_a_subprocess_checkpoints_within_one_step(tiny_moe, tmp_path):
    steps = 60
    opts = {**OPTIONS, "steps": steps, "save_every": 100}  # no regular checkpoint: only the signal writes one
    reference = tmp_path / "full"
    train(TrainConfig(model=str(tiny_moe), data=[str(DATA)], out=reference, **opts))

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "upcycle", "train", str(tiny_moe), "-d", str(DATA), "-o", str(run), *cli_args(opts)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "250"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not ((run / ck.METRICS).is_file() and (run / ck.METRICS).read_text().strip()):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no step was logged"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGTERM)
        seen = max(losses(run))  # the steps logged when the signal was sent
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    err = err.decode()
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    done = max(losses(run))
    assert seen <= done <= seen + 1, (seen, done)  # the step in flight finished, no more
    assert [s for s, _ in ck.checkpoints(run)] == [done] and not (run / "final").exists()
    assert f"stopped by SIGTERM after step {done} of {steps}; checkpoint written to" in one_line(err)

    res = train(TrainConfig(model=str(tiny_moe), data=[str(DATA)], out=run, resume=True, **opts))
    assert res.steps == steps
    assert_same(losses(reference), losses(run))


# ------------------------------------------------------------------------------------------------------- disk

def _fake_disk(monkeypatch, capacity: int, folder: Path) -> None:
    """shutil.disk_usage as a disk of `capacity` bytes that holds only `folder`."""
    real = shutil.disk_usage

    def usage(path):
        used = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0
        total = real(path)
        return type(total)(capacity, used, max(0, capacity - used))

    monkeypatch.setattr(shutil, "disk_usage", usage)


def test_a_checkpoint_that_will_not_fit_stops_the_run_cleanly(tiny_moe, full, tmp_path, monkeypatch):
    """Simulated disk of 5 MB: checkpoint-2 (3.1 MB) fits, checkpoint-4 would not. The run says so at its start,
    stops before writing checkpoint-4, and resumes exactly once there is room."""
    run = tmp_path / "run"
    _fake_disk(monkeypatch, 5_000_000, run)
    code, lines = train_cli(tiny_moe, run, 4, 2)
    assert code == 1, lines
    assert len(lines) == 2, lines
    assert lines[0].startswith("warning: disk: a checkpoint takes about 3.06 MB (estimated: fp32 weights and AdamW "
                               "state), final/ about 1.02 MB; this run writes 2 checkpoints and keeps all "
                               "(--keep-checkpoints 0): up to 7.15 MB more in"), lines
    assert lines[0].endswith("5.00 MB free; the run will stop before the first checkpoint that does not fit, or "
                             "pass --keep-checkpoints 1"), lines
    assert lines[1].startswith("error: not enough disk space for checkpoint-4: it needs about 4.19 MB, ")
    assert lines[1].endswith(f"are free in {run}; training stopped, the last good checkpoint is {run / 'checkpoint-2'} "
                             "(free some space or pass --keep-checkpoints N, then --resume)"), lines
    assert [s for s, _ in ck.checkpoints(run)] == [2] and checksum_problem(run / "checkpoint-2", hashes=True) is None
    assert not list(run.glob(".*partial")) and not (run / "final").exists()

    _fake_disk(monkeypatch, 20_000_000, run)
    code, lines = train_cli(tiny_moe, run, 4, 2, "--resume")
    assert code == 0, lines
    assert lines[0].startswith("disk: a checkpoint takes about 3.11 MB (as the last one written)"), lines
    assert_same(losses(full), losses(run))


@pytest.fixture
def tmpfs(tmp_path):
    """mount_tmpfs(size) -> a folder on a real tmpfs of that many bytes (unmounted afterwards)."""
    mounted = []

    def mount(size: int) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); "
                        "the simulated-disk test covers the check")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(where)], check=False)
            raise AssertionError(f"{where} was still in use after the run: a file left open on it")


@pytest.mark.parametrize("precheck", [True, False])
def test_full_tmpfs(tiny_moe, full, tmp_path, tmpfs, monkeypatch, precheck):
    """A real 5 MB file system. With the check, checkpoint-4 is refused before a byte of it is written; without
    it (as when something else fills the disk meanwhile) the write fails half-way, and the partial folder goes."""
    if not precheck:
        from upcycle.train import disk

        monkeypatch.setattr(disk, "room_problem", lambda *a: None)
    run = tmpfs(5_000_000) / "run"
    code, lines = train_cli(tiny_moe, run, 4, 2)
    assert code == 1, lines
    expected = ("error: not enough disk space for checkpoint-4: it needs about 4.19 MB," if precheck else
                f"error: no space left on the device while writing {run / 'checkpoint-4'}; its partial folder was "
                "removed;")
    assert lines[-1].startswith(expected), lines
    assert lines[-1].endswith(f"training stopped, the last good checkpoint is {run / 'checkpoint-2'} (free some "
                              "space or pass --keep-checkpoints N, then --resume)"), lines
    assert [s for s, _ in ck.checkpoints(run)] == [2] and checksum_problem(run / "checkpoint-2", hashes=True) is None
    assert not list(run.glob(".*partial")) and not (run / "final").exists()
    assert_same(losses(full), losses(run))  # every step up to the refused checkpoint was logged


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.slow  # three two-process launches: about a minute
def test_sigterm_to_every_process_of_a_ddp_run(tiny_moe, tmp_path):
    """As SLURM preempts: SIGTERM to the launcher and to both workers at once (SLURM signals every process of the
    job step; torchrun starts its workers in sessions of their own, out of reach of a process-group kill), and
    torchrun then sends its own SIGTERM to the workers. Both processes agree to stop after the same step, write one checkpoint, and a DDP
    --resume continues with the losses of an uninterrupted DDP run."""
    from tests.test_train_ddp import ROOT, free_port

    def command(out: Path, *extra) -> list[str]:
        accelerate = Path(sys.executable).with_name("accelerate")
        return [str(accelerate), "launch", "--config_file", str(ROOT / "examples" / "accelerate" / "ddp_cpu.yaml"),
                "--main_process_port", str(free_port()), "-m", "upcycle", "train", str(tiny_moe), "-d", str(DATA),
                "-o", str(out), *cli_args({**OPTIONS, "steps": 40, "save_every": 100}), *extra]

    reference = tmp_path / "full"
    res = subprocess.run(command(reference), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]

    run = tmp_path / "run"
    proc = subprocess.Popen(command(run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "COLUMNS": "250"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while not ((run / ck.METRICS).is_file() and (run / ck.METRICS).read_text().strip()):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no step was logged"
            time.sleep(0.005)
        for pid in [proc.pid, *_descendants(proc.pid)]:
            os.kill(pid, signal.SIGTERM)  # at once: the same moment for all, as SLURM sends it
        seen = max(losses(run))
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            for pid in [*_descendants(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
    err = err.decode()
    assert proc.returncode != 0 and "SIGKILL" not in err, err[-3000:]
    done = max(losses(run))
    assert seen <= done <= seen + 1, (seen, done)
    assert [s for s, _ in ck.checkpoints(run)] == [done] and not (run / "final").exists(), err[-3000:]
    assert checksum_problem(run / f"checkpoint-{done}", hashes=True) is None
    assert (run / f"checkpoint-{done}" / "trainer" / "random_states_1.pkl").is_file()  # both ranks saved
    assert one_line(err).count(f"stopped by SIGTERM after step {done} of 40") == 2, err[-3000:]

    res = subprocess.run(command(run, "--resume"), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same(losses(reference), losses(run))
