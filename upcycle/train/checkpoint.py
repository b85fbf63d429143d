"""The run folder: checkpoints that are standard Hugging Face model folders, written atomically, plus what an
exact resume needs.

    RUN/
      run.json                 the options of the run (and of each resume)
      metrics.jsonl            one JSON object per optimizer step
      checkpoint-STEP/         config.json, model*.safetensors (per-expert keys), tokenizer, upcycle.json, ...
        checksums.json         size and xxh3-64 hash of every other file, written last (upcycle.core.integrity)
        trainer_state.json     step, tokens, data position (upcycle.core.data state)
        trainer/               accelerate state: optimizer, scheduler, RNG of every process
        adapter/               with --lora: the LoRA adapter (PEFT format); the weights above are then the base's
      final/                   the trained model in --save-dtype, no trainer state (LoRA merged in), checksums.json
      checkpoint-STEP.damaged/ a checkpoint that failed its checksums on --resume, set aside (never loaded)
      adapter/                 with --lora: the final LoRA adapter

A checkpoint is assembled in RUN/.checkpoint-STEP.partial and renamed into place only once complete, so a run
killed at any moment leaves either the previous checkpoints or the new one, never a half-written folder that
--resume would pick. --resume checks the newest checkpoint against its checksums.json (sizes and hashes) and falls
back to the newest intact one, so a checkpoint damaged after it was written (a copy cut short, a disk error) costs
the steps since the one before it, not the run. Weights are saved with the input's own config.json (dtype
updated) instead of transformers 5's re-serialisation, because that file also carries the keys transformers 4.x
needs (rope_theta beside rope_parameters, num_experts beside num_local_experts, partial_rotary_factor).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from upcycle.core import integrity
from upcycle.core.errors import OutputError, TrainingError, UsageError
from upcycle.core.paths import METRICS, check_output_folder  # noqa: F401 (METRICS: part of the run folder layout)
from upcycle.core.tensors import FLOAT_DTYPES

RUN_FILE = "run.json"
STATE_FILE = "trainer_state.json"
TRAINER_DIR = "trainer"
FINAL = "final"
ADAPTER_DIR = "adapter"  # upcycle.train.lora.ADAPTER_DIR
STATE_FORMAT = "upcycle.train/1"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
_PARTIAL = re.compile(r"^\.(checkpoint-\d+|final|adapter)\.partial$")
# Files of a model folder that are weights (rewritten from the trained model) or trainer state, not copied.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
_NOT_COPIED = {"model.safetensors.index.json", "pytorch_model.bin.index.json", STATE_FILE, integrity.CHECKSUMS}
DAMAGED = ".damaged"  # suffix of a checkpoint set aside by --resume


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    found = []
    if out.is_dir():
        for p in out.iterdir():
            m = _CKPT.match(p.name)
            if m and p.is_dir() and (p / STATE_FILE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def check_run_dir(out: Path, resume: bool, warn: Callable[[str], None] | None = None) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); refuse what cannot work before any compute.

    The newest checkpoint that passes its checksums (upcycle.core.integrity, hashes included) is the one; when a
    newer one fails, `warn` gets one line naming it, what is wrong and how many steps the run goes back."""
    check_output_folder(out, option="--out", overwrite=resume,
                        conflicts=lambda d: [p.name for p in d.iterdir() if not _PARTIAL.match(p.name)],
                        fix="pass --resume to continue the run in it, or choose a new folder")
    if not resume:
        return None
    found = checkpoints_any(out)
    if not found:
        where = "does not exist" if not out.exists() else "holds no complete checkpoint-STEP folder"
        raise TrainingError(f"nothing to resume: {out} {where}")
    damaged: list[tuple[str, str]] = []
    for step, p in reversed(found):
        problem = integrity.checksum_problem(p, hashes=True)
        if problem is None:
            if damaged and warn is not None:
                back = found[-1][0] - step
                names = [d[0] for d in damaged]
                what = (f"{names[0]} is damaged ({damaged[0][1]})" if len(damaged) == 1 else
                        ", ".join(f"{n} ({why})" for n, why in damaged) + " are damaged")
                aside = f"{names[0]}{DAMAGED}" if len(names) == 1 else f"*{DAMAGED}"
                warn(f"{what}; resuming from {p.name}, {back} step{'s' * (back != 1)} back "
                     f"({', '.join(names)} set aside as {aside})")
            return p
        damaged.append((p.name, problem))
    shown = "; ".join(f"{n}: {why}" for n, why in damaged[:3])
    if len(damaged) > 3:
        shown += f"; {len(damaged) - 3} more"
    raise TrainingError(f"nothing to resume: no intact checkpoint in {out} ({shown})")


def set_aside_newer(out: Path, resume_dir: Path) -> None:
    """Rename the checkpoints newer than the one resumed from (they failed their checksums) to *.damaged, so that
    neither a later --resume nor pruning mistakes them for the newest."""
    resumed = int(_CKPT.match(resume_dir.name).group(1))
    for step, p in checkpoints_any(out):
        if step > resumed:
            aside = p.with_name(p.name + DAMAGED)
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(p, aside)


def checkpoints_any(out: Path) -> list[tuple[int, Path]]:
    """Every checkpoint-STEP folder, complete or not, oldest first."""
    if not out.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in out.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir())


def remove_partials(out: Path) -> None:
    """Half-written checkpoints of a killed run."""
    if out.is_dir():
        for p in out.iterdir():
            if _PARTIAL.match(p.name):
                shutil.rmtree(p, ignore_errors=True)


def read_state(ckpt: Path) -> dict:
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot resume from {ckpt}: {STATE_FILE} unreadable ({exc})") from None
    if state.get("format") != STATE_FORMAT:
        raise TrainingError(f"cannot resume from {ckpt}: not written by this version of upcycle train")
    return state


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def check_same_model(out: Path, model: str) -> None:
    run = out / RUN_FILE
    if not run.is_file():
        return
    try:
        before = json.loads(run.read_text()).get("config", {}).get("model")
    except ValueError:
        return
    if before and Path(before).resolve() != Path(model).resolve() and before != model:
        raise UsageError(f"--resume: {out} trains {before}, not {model}")


def source_dtype(config_json: dict) -> str:
    d = config_json.get("dtype") or config_json.get("torch_dtype") or "float32"
    return d if d in FLOAT_DTYPES else "float32"


def copy_model_files(src: Path | None, dst: Path, dtype: str) -> None:
    """Copy config.json (dtype updated) and every non-weight file (tokenizer, upcycle.json, README.md,
    generation config, chat template) from the input model folder over what save_pretrained wrote."""
    if src is None or not (src / "config.json").is_file():
        return
    for p in src.iterdir():
        if not p.is_file() or p.name in _NOT_COPIED or p.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if p.name == "config.json":
            cfg = json.loads(p.read_text())
            keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype", "torch_dtype"]
            for k in keys:
                cfg[k] = dtype
            (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(p, dst / p.name)


def _cast(state_dict: dict, dtype: str) -> dict:
    import torch

    target = getattr(torch, dtype)
    out = {}
    for k, v in state_dict.items():
        # the aux-loss-free selection bias stays fp32, as convert writes it: +-1e-3 steps vanish in bf16
        keep = not v.is_floating_point() or k.endswith("e_score_correction_bias")
        out[k] = v if keep else v.to(target)
    return out


def save_model(accelerator, model, tokenizer, folder: Path, src: Path | None, dtype: str, *, lora=None,
               merge: bool = False) -> None:
    """Write the model as a standard Hugging Face folder (per-expert keys) into `folder` (all processes call).

    In a LoRA run (`lora`, upcycle.train.lora.LoraSetup) the folder holds the base weights plus the adapter in
    folder/adapter, or with `merge` the weights with the adapter merged in."""
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP shards; every process must call it
    if accelerator.is_main_process:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        unwrapped = accelerator.unwrap_model(model)
        if lora is not None:
            from upcycle.train import lora as lora_io

            if merge:
                state_dict = lora_io.merge_into_base(unwrapped, state_dict)  # the run is over: in place
            else:
                lora_io.save_adapter(unwrapped, folder / ADAPTER_DIR)
                state_dict = lora_io.base_state_dict(state_dict)
            unwrapped = unwrapped.get_base_model()
        if dtype != "float32":
            state_dict = _cast(state_dict, dtype)
        unwrapped.save_pretrained(folder, state_dict=state_dict, safe_serialization=True, max_shard_size="5GB")
        tokenizer.save_pretrained(folder)
        copy_model_files(src, folder, dtype)


def save_checkpoint(accelerator, model, tokenizer, out: Path, step: int, state: dict, src: Path | None,
                    *, final: bool = False, dtype: str = "float32", lora=None) -> Path:
    """checkpoint-STEP (fp32 weights + trainer state) or final (weights in `dtype`), atomically, with its
    checksums.json written last.

    With `lora`: a checkpoint holds the base weights and its adapter/; final/ the merged weights, and the final
    adapter goes to RUN/adapter/ (written first, so a complete final/ always has its adapter beside it).
    A write the disk cannot hold raises OutputError (one line) and leaves no partial folder behind."""
    name = FINAL if final else f"checkpoint-{step}"
    tmp, dst = out / f".{name}.partial", out / name
    partials = (tmp, out / f".{ADAPTER_DIR}.partial")
    try:
        return _save_checkpoint(accelerator, model, tokenizer, out, step, state, src, final, dtype, lora, tmp, dst)
    except Exception as exc:
        from upcycle.train.disk import is_disk_full

        if not is_disk_full(out, exc):  # asked before the partial folders go, which frees the space again
            if accelerator.is_main_process:
                for p in partials:
                    shutil.rmtree(p, ignore_errors=True)
            raise
    # Out of the except block, the failed write's traceback is gone, and with it the file torch.save leaves open
    # when the disk fills (its writer closes the file only after the end record, which did not fit): removing the
    # partial folder now frees its space, and the error below carries no chain back to that file.
    if accelerator.is_main_process:
        for p in partials:
            shutil.rmtree(p, ignore_errors=True)
    raise OutputError(f"no space left on the device while writing {dst}; its partial folder was removed")


def _save_checkpoint(accelerator, model, tokenizer, out, step, state, src, final, dtype, lora, tmp, dst) -> Path:
    if final and lora is not None and accelerator.is_main_process:
        from upcycle.train import lora as lora_io

        part = out / f".{ADAPTER_DIR}.partial"
        shutil.rmtree(part, ignore_errors=True)
        lora_io.save_adapter(accelerator.unwrap_model(model), part)
        _fsync_tree(part)
        shutil.rmtree(out / ADAPTER_DIR, ignore_errors=True)
        os.replace(part, out / ADAPTER_DIR)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_model(accelerator, model, tokenizer, tmp, src, dtype, lora=lora, merge=final)
    if not final:
        accelerator.save_state(str(tmp / TRAINER_DIR))  # every process writes its own RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / STATE_FILE, {"format": STATE_FORMAT, **state})
        integrity.write_checksums(tmp)  # last: a folder without it was never finished
        _fsync_tree(tmp)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
        _fsync_dir(out)
    accelerator.wait_for_everyone()
    return dst


def prune(out: Path, keep: int) -> None:
    """Keep the `keep` newest checkpoints (0: all)."""
    if keep <= 0:
        return
    for _, p in checkpoints(out)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


class MetricsLog:
    """metrics.jsonl: one JSON object per optimizer step, flushed per line (a SIGKILL loses at most the line
    being written). On resume, lines after the resumed step are dropped: the resumed run writes them again."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True):
        self.path = path
        self.file = None
        if not enabled:
            return
        if resume_step is not None and path.is_file():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut by the kill
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= resume_step:
                    kept.append(line)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(k + "\n" for k in kept))
            os.replace(tmp, path)
        elif path.exists():
            path.unlink()
        self.file = open(path, "a")

    def write(self, row: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(row, allow_nan=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
