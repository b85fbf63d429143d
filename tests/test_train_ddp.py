"""Distributed `upcycle train` through `accelerate launch` on this CPU-only machine: DDP with 2 processes over gloo
(examples/accelerate/ddp_cpu.yaml). Slow (each launch starts two Python processes): run with `pytest -m slow`.

- 2 processes x batch 2 give the losses and weights of 1 process x batch 4 (the same blocks: rank r takes block r of
  every round of 2), with the aux loss off, since each process balances its own micro-batch (Switch, Megatron).
- Freezing (--train with expert indices and groups), a capacity factor, router jitter and gradient accumulation
  run under DDP; frozen tensors stay bit-identical; a resume from a DDP checkpoint reproduces the uninterrupted
  DDP run (every rank's RNG and data position come back).
- FSDP: accelerate enables it only on accelerators (with cpu=True it would run DDP); an FSDP launch here is
  refused with one clear line (examples/accelerate/fsdp.yaml is for GPUs).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from upcycle.assets import stdlib_dir
from upcycle.convert import convert
from upcycle.train import TrainConfig, train

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DATA = stdlib_dir() / "json"
FAST = ["--seq-len", "32", "--precision", "fp32", "--experts-impl", "eager", "--eval-every", "0"]


@pytest.fixture(scope="module")
def tiny_moe(tiny_parent, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe") / "m"
    convert(tiny_parent("llama"), out, experts=4, top_k=2, verify=False, quiet=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "examples" / "accelerate" / config),
           "--main_process_port", str(free_port()), "-m", "upcycle", "train", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_ddp_two_processes_match_one_process(tiny_moe, tmp_path):
    ddp = tmp_path / "ddp"
    res = launch("ddp_cpu.yaml", tiny_moe, "-d", DATA, "-o", ddp, "--steps", "3", "-b", "2", "--save-every", "2",
                 "--aux-loss-coef", "0", *FAST)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((ddp / "run.json").read_text())["world_size"] == 2
    one = tmp_path / "one"
    train(TrainConfig(model=str(tiny_moe), data=[str(DATA)], out=one, steps=3, batch_size=4, save_every=2,
                      aux_loss_coef=0.0, seq_len=32, precision="fp32", experts_impl="eager", eval_every=0))
    a, b = rows(ddp), rows(one)
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b] == [128, 256, 384]
    for key in ("loss", "z_loss", "grad_norm"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-5), key
    # the routing statistics are reduced over both processes: the same counts as one process sees
    assert [r["expert_load"] for r in a] == [r["expert_load"] for r in b]
    wa, wb = weights(ddp / "final"), weights(one / "final")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    assert (ddp / "checkpoint-2" / "trainer" / "random_states_1.pkl").is_file()  # every rank's RNG is saved


def test_ddp_with_freezing_capacity_jitter_and_exact_resume(tiny_moe, tmp_path):
    opts = ["--steps", "4", "-b", "1", "--grad-accum", "2", "--save-every", "2", "--train", "experts:0=1,2;1=3",
            "--train", "router", "--router-lr-mult", "5", "--capacity-factor", "1.0", "--router-jitter", "0.05",
            "--lr", "1e-3", *FAST]
    full = tmp_path / "full"
    res = launch("ddp_cpu.yaml", tiny_moe, "-d", DATA, "-o", full, *opts)
    assert res.returncode == 0, res.stderr[-3000:]
    w0, w1 = weights(tiny_moe), weights(full / "final")
    changed = {k for k in w0 if not torch.equal(w0[k], w1[k])}
    expect = {f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight" for e in (1, 2) for w in ("w1", "w2", "w3")}
    expect |= {f"model.layers.1.block_sparse_moe.experts.3.{w}.weight" for w in ("w1", "w2", "w3")}
    expect |= {f"model.layers.{i}.block_sparse_moe.gate.weight" for i in (0, 1)}
    assert changed == expect
    assert all(r["dropped_frac"] > 0 for r in rows(full))

    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for name in ("checkpoint-4", "final"):
        shutil.rmtree(cut / name)
    res = launch("ddp_cpu.yaml", tiny_moe, "-d", DATA, "-o", cut, *opts, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = rows(full), rows(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("loss", "aux_loss", "z_loss", "grad_norm"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-6), key
    wc = weights(cut / "final")
    assert all(torch.equal(w1[k], wc[k]) for k in w1)


def test_fsdp_launch_on_cpu_is_refused_clearly(tiny_moe, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: FSDP would run")
    cfg = tmp_path / "fsdp2.yaml"
    text = (ROOT / "examples" / "accelerate" / "fsdp.yaml").read_text().replace("num_processes: 8", "num_processes: 2")
    cfg.write_text(text)
    accelerate = Path(sys.executable).with_name("accelerate")
    res = subprocess.run([str(accelerate), "launch", "--config_file", str(cfg), "--main_process_port", str(free_port()),
                          "-m", "upcycle", "train", str(tiny_moe), "-d", str(DATA), "-o", str(tmp_path / "run"),
                          "--steps", "1", *FAST], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode != 0
    assert "FSDP needs GPUs (accelerate runs it on accelerators only)" in " ".join(res.stderr.split())
    # the launcher reports the failed children with its own traceback; upcycle's processes print only the line
    assert str(ROOT / "upcycle") not in res.stderr and not (tmp_path / "run").exists()
