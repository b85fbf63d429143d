"""Disk space for a run's checkpoints: what the run will need, said at its start, and a check before each write.

A checkpoint-STEP holds the fp32 weights (4 bytes per parameter) and AdamW's two fp32 moments (8 bytes per
trainable parameter) plus small files; final/ holds the weights in --save-dtype. Until the run has written (or
resumes from) a checkpoint its size is this estimate; after that it is the size its checksums.json records, which
every later checkpoint of the run repeats to within a few bytes. Each write is checked against the free space
first: a checkpoint that will not fit stops the run with the last good one intact instead of filling the disk
halfway (which would leave nothing for the user's other work either).
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass
from pathlib import Path

from upcycle.core.tensors import human_bytes

WEIGHT_BYTES = 4  # checkpoints are fp32 so that --resume is exact
ADAM_BYTES = 8  # exp_avg and exp_avg_sq, fp32


def margin(size: int) -> int:
    """Room asked for on top of a write of `size` bytes: file system blocks, the JSON files, an estimate's slack."""
    return size // 100 + (1 << 20)


@dataclass(frozen=True)
class ModelSizes:
    params: int  # every parameter the checkpoint's weights hold (LoRA adapters included)
    trainable: int  # those the optimizer keeps moments for
    final_params: int  # what final/ holds (adapters merged in)

    def checkpoint_estimate(self) -> int:
        return WEIGHT_BYTES * self.params + ADAM_BYTES * self.trainable

    def final_estimate(self, dtype_bytes: int) -> int:
        return dtype_bytes * self.final_params


def model_sizes(model) -> ModelSizes:
    """Parameter counts of the model about to be trained (before accelerate wraps or shards it)."""
    params = trainable = final = 0
    for name, p in model.named_parameters():
        params += p.numel()
        trainable += p.numel() if p.requires_grad else 0
        final += 0 if "lora_" in name else p.numel()
    return ModelSizes(params, trainable, final)


def free_bytes(path: Path) -> int:
    """Free space (for this user) on the file system that holds `path`, or would hold it once created."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


@dataclass(frozen=True)
class DiskPlan:
    checkpoint: int  # bytes of one checkpoint-STEP
    measured: bool  # from a checkpoint's checksums.json (else the estimate)
    final: int  # bytes of final/ (estimated)
    writes: int  # checkpoints this run will still write
    keep: int  # --keep-checkpoints (0: all)
    peak: int  # the most the run adds to the disk at any moment
    free: int

    @property
    def short(self) -> bool:
        return self.peak + margin(self.peak) > self.free

    def describe(self, out: Path) -> str:
        how = "as the last one written" if self.measured else "estimated: fp32 weights and AdamW state"
        kept = "keeps all (--keep-checkpoints 0)" if not self.keep else f"keeps the newest {self.keep}"
        line = (f"disk: a checkpoint takes about {human_bytes(self.checkpoint)} ({how}), final/ about "
                f"{human_bytes(self.final)}; this run writes {self.writes} checkpoint{'s' * (self.writes != 1)} "
                f"and {kept}: up to {human_bytes(self.peak)} more in {out}, {human_bytes(self.free)} free")
        if self.short:
            line += ("; the run will stop before the first checkpoint that does not fit"
                     + ("" if self.keep == 1 else ", or pass --keep-checkpoints 1"))
        return line


def plan(out: Path, *, checkpoint: int, measured: bool, final: int, start: int, total: int, save_every: int,
         keep: int, existing: int) -> DiskPlan:
    """What the steps start+1..total will write: a checkpoint every `save_every` steps (pruned to the `keep`
    newest after each write, counting the `existing` ones) and final/ at the end."""
    writes = (total // save_every - start // save_every) if save_every > 0 else 0
    on_disk, peak = existing, 0
    for _ in range(writes):
        on_disk += 1  # written in full before the oldest is pruned
        peak = max(peak, (on_disk - existing) * checkpoint)
        if keep > 0:
            on_disk = min(on_disk, keep)
    peak = max(peak, (on_disk - existing) * checkpoint + final)
    return DiskPlan(checkpoint, measured, final, writes, keep, peak, free_bytes(out))


def room_problem(out: Path, name: str, size: int) -> str | None:
    """Why `name` (about `size` bytes) cannot be written into `out` now, or None when it fits."""
    free = free_bytes(out)
    need = size + margin(size)
    if need <= free:
        return None
    return (f"not enough disk space for {name}: it needs about {human_bytes(need)}, {human_bytes(free)} are free "
            f"in {out}")


def is_disk_full(path: Path, exc: BaseException) -> bool:
    """Whether a failed write was the disk filling up. safetensors and torch.save do not always keep the OSError
    (torch says only 'unexpected pos'), so a disk with (almost) nothing left counts too; call this before removing
    what the failed write left."""
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(exc):
        return True
    try:
        return free_bytes(path) < (1 << 20)
    except OSError:
        return False
