"""Distributed `upcycle train` through `accelerate launch` on this CPU-only machine: DDP with 2 processes over gloo
(examples/accelerate/ddp_cpu.yaml). Slow (each launch starts two Python processes): run with `pytest -m slow`.

- 2 processes x batch 2 give the losses and weights of 1 process x batch 4 (the same blocks: rank r takes block r of
  every round of 2), with the aux loss off, since each process balances its own micro-batch (Switch, Megatron).
- Freezing (--train with expert indices and groups), a capacity factor, router jitter and gradient accumulation
  run under DDP; frozen tensors stay bit-identical; a resume from a DDP checkpoint reproduces the uninterrupted
  DDP run (every rank's RNG and data position come back).
- FSDP: accelerate enables it only on accelerators (with cpu=True it would run DDP); an FSDP launch here is
  refused with one clear line (examples/accelerate/fsdp.yaml is for GPUs). What can be checked on CPU is checked
  at the torch level: upcycle's training pieces (fp32 router with capacity, routing recorder, aux/z losses,
  partial expert masks, frozen groups) under torch's FSDP2 `fully_shard` per decoder layer, 2 gloo processes.
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

from upcycle.core.assets import stdlib_dir
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
    # the router-gradient split too: its router-loss part is averaged over processes as DDP averages gradients
    for key in ("loss", "z_loss", "grad_norm", "router_grad_norm", "router_grad_norm_aux"):
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

FSDP2_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from upcycle.families.moe.routing import RoutingRecorder, moe_layers
from upcycle.train.config import parse_train
from upcycle.train.freeze import apply_selection, param_groups
from upcycle.train.losses import router_losses
from upcycle.train.model import load_for_training
from upcycle.train.router import RouterControls, RouterPatch

model_dir, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
WORLD = 2
sharded = mode == "fsdp2"
if sharded:
    dist.init_process_group("gloo")
rank = dist.get_rank() if sharded else 0
model = load_for_training(model_dir, experts_impl="grouped_mm", allow_pickle=False)
layers = moe_layers(model)
RouterPatch(layers, RouterControls(capacity_factor=1.0, jitter=0.01))
apply_selection(model, layers, parse_train(["experts:0=1", "router"]))
before = {n: p.detach().clone() for n, p in model.named_parameters()}
if sharded:
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
opt = torch.optim.AdamW(param_groups(model, layers, lr=1e-2, weight_decay=0.1, router_lr_mult=1.0), lr=1e-2)
# Each rank's random stream (its batches and router jitter); the unsharded run replays both ranks' streams in
# turn and averages their losses, which is what FSDP2's gradient averaging computes.
ranks = [rank] if sharded else list(range(WORLD))
rng = {}
for r in ranks:
    torch.manual_seed(r)
    rng[r] = torch.get_rng_state()
losses = {r: [] for r in ranks}
with RoutingRecorder(model, detach=False, layers=layers) as rec:
    for _ in range(2):
        for r in ranks:
            torch.set_rng_state(rng[r])
            ids = torch.randint(0, 256, (2, 32))
            out_ = model(input_ids=ids, labels=ids)
            records = rec.drain()
            aux, z = router_losses(layers, records)
            ((out_.loss + 0.01 * aux + 1e-3 * z) / (1 if sharded else WORLD)).backward()
            rng[r] = torch.get_rng_state()
            losses[r].append([float(out_.loss.detach()), float(aux.detach()), float(z.detach()),
                              float((~records[0].kept).sum()) if records[0].kept is not None else 0.0])
        opt.step()
        opt.zero_grad()
after = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in model.named_parameters()}
changed = {}
for n, p in after.items():
    if n.endswith("experts.gate_up_proj") or n.endswith("experts.down_proj"):
        changed[n] = [not torch.equal(p[e], before[n][e]) for e in range(p.shape[0])]
    else:
        changed[n] = not torch.equal(p, before[n])
if rank == 0:
    with open(out, "w") as f:
        json.dump({"losses": losses[0], "changed": changed}, f)
    torch.save(after, out + ".pt")
if sharded:
    dist.destroy_process_group()
"""


def test_training_pieces_under_torch_fsdp2_on_cpu(tiny_moe, tmp_path):
    script = tmp_path / "fsdp2_probe.py"
    script.write_text(FSDP2_SCRIPT)
    out, ref = tmp_path / "result.json", tmp_path / "unsharded.json"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), str(script), str(tiny_moe), str(out), "fsdp2"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([sys.executable, str(script), str(tiny_moe), str(ref), "unsharded"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    got, want = json.loads(out.read_text()), json.loads(ref.read_text())
    # rank 0's losses (LM, aux, z, dropped) and the trained weights are those of one unsharded process that runs
    # both ranks' batches and averages their losses, as the DDP test checks for accelerate's DDP
    for row, expected in zip(got["losses"], want["losses"], strict=True):
        assert row == pytest.approx(expected, rel=1e-5)
    wa, wb = torch.load(str(out) + ".pt"), torch.load(str(ref) + ".pt")
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    assert got["changed"] == want["changed"]
    assert all(all(map(lambda v: v == v and abs(v) < 1e4, row)) for row in got["losses"])
    assert any(row[3] > 0 for row in got["losses"])  # the capacity factor dropped assignments under FSDP2
    changed = got["changed"]
    # (in-memory names: fused experts, mlp.gate) layer 0: only expert 1 of the fused tensors moved; layer 1: none;
    # both routers trained; nothing else
    assert changed["model.layers.0.mlp.experts.gate_up_proj"] == [False, True, False, False]
    assert changed["model.layers.0.mlp.experts.down_proj"] == [False, True, False, False]
    assert changed["model.layers.1.mlp.experts.gate_up_proj"] == [False] * 4
    assert changed["model.layers.0.mlp.gate.weight"] and changed["model.layers.1.mlp.gate.weight"]
    others = [n for n, v in changed.items() if isinstance(v, bool) and v and ".gate.weight" not in n]
    assert others == []
