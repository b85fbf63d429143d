"""What a command-line path means, decided in one place: local path or hub id, whether the hub may be asked, and
whether an output folder may be written.

Hub ids follow huggingface_hub's own validation (owner/name, letters, digits, "-", "_", "."; no "--" or "..";
not ending in ".git"), minus what is more likely a mistyped local path: a spec whose first part is an existing
folder ("data/trian.jsonl") or whose name ends in a local file type (".jsonl", ".gguf", ...). An existing path is
never a hub id.

Offline follows the libraries that would do the fetching, read at call time: models go through huggingface_hub
(HF_HUB_OFFLINE, else TRANSFORMERS_OFFLINE), datasets through `datasets` (HF_DATASETS_OFFLINE when set, else the
hub's setting). A variable counts as on for 1, true, yes or on (any case), as in huggingface_hub; "0", "false"
and "off" mean online.

Output folders: an --out is never a file, and the folder it will be created in must be writable, checked before
any compute. What an existing folder may hold depends on how the command writes (see check_output_folder).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from upcycle.core.errors import OutputError

METRICS = "metrics.jsonl"  # a training run folder's per-step log (written by upcycle train, read by upcycle eval)

_TRUE = ("1", "true", "yes", "on")
_HUB_NAME = re.compile(r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?")
# file types a user names locally; a hub repository's name never ends like this in practice
LOCAL_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl", ".json", ".parquet", ".csv",
                  ".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _env_true(name: str) -> bool | None:
    """None when unset (or empty), else whether the variable is on."""
    value = os.environ.get(name, "").strip()
    return None if not value else value.lower() in _TRUE


def hub_offline() -> bool:
    """Whether huggingface_hub would refuse to fetch a model now."""
    hub = _env_true("HF_HUB_OFFLINE")
    return bool(hub if hub is not None else _env_true("TRANSFORMERS_OFFLINE"))


def datasets_offline() -> bool:
    """Whether `datasets` would refuse to fetch a hub dataset now."""
    ds = _env_true("HF_DATASETS_OFFLINE")
    return ds if ds is not None else hub_offline()


def is_hub_id(spec: str | Path) -> bool:
    """Whether `spec` names a hub repository ("owner/name") rather than a local path (see the module docstring)."""
    s = str(spec)
    if Path(s).expanduser().exists():
        return False
    parts = s.split("/")
    if len(parts) != 2 or not all(_HUB_NAME.fullmatch(p) for p in parts):
        return False
    if "--" in s or ".." in s or s.endswith(".git"):
        return False
    return not Path(parts[0]).is_dir() and not parts[1].lower().endswith(LOCAL_SUFFIXES)


def check_output_folder(out: Path, *, option: str = "", overwrite: bool = False,
                        conflicts: Callable[[Path], list[str]] | None = None, fix: str = "pass --overwrite to replace it",
                        parents: bool = True) -> None:
    """Refuse an output folder that cannot be written, before any compute.

    `out` must not be a file, and the nearest existing folder above it must be writable (with parents=False:
    its parent folder must exist). An existing `out` is refused
    when it holds anything (default) or, with `conflicts`, the names `conflicts(out)` returns, unless `overwrite`;
    `fix` says how to go on. `option` names the flag in messages ("" for a positional OUT).
    Commands that replace the whole folder (convert, demo) keep the default; one that adds files to it (eval)
    names only the files it would replace; one that never overwrites (train) passes what it may find there.
    """
    out = Path(out)
    what = f"{option} {out}" if option else str(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{what} is a file, not a folder")
    if out.is_dir() and not overwrite:
        if conflicts is None:
            if any(out.iterdir()):
                raise OutputError(f"{what} is not empty; {fix}")
        elif found := sorted(conflicts(out)):
            raise OutputError(f"{what} is not empty ({', '.join(found[:3])}); {fix}")
    # the nearest existing folder above `out` is where it will be created (or, replacing it whole, renamed into)
    parent = out.resolve().parent
    if not parents and not parent.is_dir():
        raise OutputError(f"cannot create {out}: {parent} does not exist")
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create {out}: {parent} is a file")
    if (conflicts is None or not out.is_dir()) and not os.access(parent, os.W_OK):
        raise OutputError(f"cannot create {out}: {parent} is not writable")
