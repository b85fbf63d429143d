"""A pinned CPU build of llama.cpp, made from the package registry and cached outside the repository.

llama.cpp is not on PyPI as a tool, but the `llama-cpp-python` sdist vendors one exact llama.cpp tree (the C++
sources, its own `convert_hf_to_gguf.py` and its `gguf-py`). This script downloads that sdist with pip (pinned by
version and SHA-256), unpacks it under the upcycle cache (`$UPCYCLE_CACHE` or `~/.cache/upcycle`), and builds the
few programs the GGUF tests and benchmark run, with cmake and ninja, CPU only, no network code. A finished build
leaves a stamp file; later calls reuse it, so CI rebuilds only when the cache is cold or the pin changes.

    python benchmarks/llama_cpp.py build      # prints the folder holding the binaries
    python benchmarks/llama_cpp.py where      # same, but fails instead of building

Nothing from the sdist is copied into the repository.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# llama-debug saves the last position's logits as raw float32; llama-completion decodes greedily; llama-perplexity
# scores a text; llama (the shared library) serves the ctypes reader in gguf_llama_logits.py.
TARGETS = ("llama-debug", "llama-completion", "llama-perplexity", "llama")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
)


def cache_root() -> Path:
    base = os.environ.get("UPCYCLE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "upcycle")
    return Path(base) / f"llama.cpp-{VERSION}"


def source_dir() -> Path:
    return cache_root() / "src" / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"


def build_dir() -> Path:
    return cache_root() / "build"


def bin_dir() -> Path:
    return build_dir() / "bin"


def stamp() -> Path:
    return build_dir() / "upcycle-build.ok"


def converter() -> Path:
    """llama.cpp's own Hugging Face -> GGUF converter from the same tree."""
    return source_dir() / "convert_hf_to_gguf.py"


# The converter imports sentencepiece before it looks for a tokenizer.model, even for BPE tokenizers like
# SmolLM2's; installed with pip --target beside the build (the range is the converter's own requirements file).
CONVERTER_DEPS = ("sentencepiece>=0.1.98,<0.3.0",)


def pydeps_dir() -> Path:
    return cache_root() / "pydeps"


def converter_env() -> dict[str, str]:
    """Environment that makes the converter import the gguf-py of its own tree (not whatever gguf is installed)
    and its extra dependencies from the cache."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(source_dir() / "gguf-py"), str(source_dir()), str(pydeps_dir())])
    return env


def converter_ready() -> Path:
    """The converter script, with its extra dependencies installed (once) under the cache."""
    if not (source_dir() / "CMakeLists.txt").is_file():
        raise SystemExit(f"no llama.cpp sources under {source_dir()}; run: python benchmarks/llama_cpp.py build")
    if not (pydeps_dir() / ".ok").is_file():
        tmp = Path(tempfile.mkdtemp(dir=cache_root(), prefix="pydeps."))
        try:
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp),
                            *CONVERTER_DEPS], check=True)
            (tmp / ".ok").write_text("\n".join(CONVERTER_DEPS) + "\n")
            shutil.rmtree(pydeps_dir(), ignore_errors=True)
            os.replace(tmp, pydeps_dir())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return converter()


def convert_hf(folder: Path, out: Path, outtype: str = "f32") -> Path:
    """llama.cpp's own convert_hf_to_gguf.py on a Hugging Face folder."""
    script = converter_ready()
    res = subprocess.run([sys.executable, str(script), str(folder), "--outfile", str(out), "--outtype", outtype],
                         capture_output=True, text=True, env=converter_env(), timeout=1800)
    if res.returncode != 0:
        tail = [line for line in (res.stderr or res.stdout).strip().splitlines() if line.strip()][-1:]
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {folder}: {tail[0] if tail else res.returncode}")
    return out


def ready() -> bool:
    return stamp().is_file() and all((bin_dir() / t).exists() for t in TARGETS if t != "llama")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _fetch_sdist(log) -> Path:
    dl = cache_root() / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    path = dl / SDIST
    if not path.is_file():
        log(f"downloading llama-cpp-python=={VERSION} (sdist) with pip")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet", "-d", str(dl),
               f"llama-cpp-python=={VERSION}"]
        subprocess.run(cmd, check=True)
    digest = _sha256(path)
    if digest != SHA256:
        path.unlink()
        raise SystemExit(f"{SDIST}: SHA-256 {digest} is not the pinned {SHA256}; removed it")
    return path


def _unpack(sdist: Path, log) -> None:
    if (source_dir() / "CMakeLists.txt").is_file():
        return
    log(f"unpacking {sdist.name}")
    dest = cache_root() / "src"
    tmp = Path(tempfile.mkdtemp(dir=cache_root(), prefix="src."))
    try:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build(jobs: int | None = None, log=lambda s: print(s, file=sys.stderr)) -> Path:
    """Build (or reuse) the pinned llama.cpp; return the folder with its binaries."""
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / "build.lock", "w") as lock:
        # two test processes (or a test and the benchmark) must not build into the same folder at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready():
            return bin_dir()
        for tool in ("cmake", "ninja"):
            if shutil.which(tool) is None:
                raise SystemExit(f"building llama.cpp needs {tool} on PATH")
        _unpack(_fetch_sdist(log), log)
        t0 = time.time()
        build_dir().mkdir(parents=True, exist_ok=True)
        subprocess.run(["cmake", "-S", str(source_dir()), "-B", str(build_dir()), "-G", "Ninja", *CMAKE_FLAGS],
                       check=True, stdout=subprocess.DEVNULL)
        cmd = ["cmake", "--build", str(build_dir()), "--target", *TARGETS]
        if jobs:
            cmd += ["-j", str(jobs)]
        subprocess.run(cmd, check=True)
        stamp().write_text(f"llama-cpp-python {VERSION}\nbuild seconds {time.time() - t0:.0f}\n")
        log(f"built llama.cpp from llama-cpp-python {VERSION} in {time.time() - t0:.0f} s")
        return bin_dir()


def build_seconds() -> float | None:
    """Wall time of the cold build that made the cached binaries, as the stamp recorded it."""
    if not stamp().is_file():
        return None
    for line in stamp().read_text().splitlines():
        if line.startswith("build seconds "):
            return float(line.split()[-1])
    return None


# ------------------------------------------------------------------------------------------- running the tools


def _run(cmd: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({res.returncode}):\n{tail}")
    return res


def last_logits(model: Path, prompt: str, *, threads: int = 2, ubatch: int | None = None,
                work: Path | None = None) -> np.ndarray:
    """llama.cpp's float32 logits for the token after `prompt` (llama-debug --save-logits), one process per call."""
    import numpy as np

    with tempfile.TemporaryDirectory(dir=work) as tmp:
        tmp = Path(tmp)
        (tmp / "prompt.txt").write_text(prompt)
        cmd = [str(bin_dir() / "llama-debug"), "-m", str(model), "-f", str(tmp / "prompt.txt"), "--save-logits",
               "--logits-output-dir", str(tmp / "out"), "-t", str(threads), "-c", "2048", "--no-warmup"]
        if ubatch:
            cmd += ["-ub", str(ubatch)]
        _run(cmd)
        return np.fromfile(tmp / "out" / f"llamacpp-{model.stem}.bin", dtype=np.float32)


def greedy(model: Path, prompt: str, n_tokens: int = 32, *, threads: int = 2, ubatch: int | None = None,
           work: Path | None = None) -> str:
    """The text llama.cpp generates after `prompt` at temperature 0 (llama-completion, no chat template)."""
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        path = Path(tmp) / "prompt.txt"
        path.write_text(prompt)
        cmd = [str(bin_dir() / "llama-completion"), "-m", str(model), "-f", str(path), "-n", str(n_tokens),
               "--temp", "0", "-no-cnv", "--no-display-prompt", "-t", str(threads), "-c", "2048", "--no-warmup",
               "--seed", "0"]
        if ubatch:
            cmd += ["-ub", str(ubatch)]
        return _run(cmd).stdout


def kl_divergence(base: Path, model: Path, text: Path, *, ctx: int = 128, chunks: int = 8, threads: int = 2,
                  model_ubatch: int | None = None, work: Path | None = None) -> dict:
    """llama-perplexity's comparison of `model` with `base` over every position of `text`: the base's log-probs
    are saved first (--kl-divergence-base), then the model is scored against them (--kl-divergence), optionally
    with another micro-batch size (the base against itself so gives llama.cpp's own noise)."""
    import re

    with tempfile.TemporaryDirectory(dir=work) as tmp:
        saved = Path(tmp) / "base.kld"
        common = ["-f", str(text), "-c", str(ctx), "--chunks", str(chunks), "-t", str(threads), "--no-warmup"]
        base_out = _run([str(bin_dir() / "llama-perplexity"), "-m", str(base), *common,
                         "--kl-divergence-base", str(saved)])
        res = _run([str(bin_dir() / "llama-perplexity"), "-m", str(model), *common, "--kl-divergence-base",
                    str(saved), "--kl-divergence", *(["-ub", str(model_ubatch)] if model_ubatch else [])])
    text_out = res.stdout + res.stderr
    stats = {}
    for key, pattern in {"ppl_base": r"Mean PPL\(base\)\s*:\s*([0-9.eE+-]+)",
                         "ppl_model": r"Mean PPL\(Q\)\s*:\s*([0-9.eE+-]+)",
                         "mean_kld": r"Mean\s+KLD:\s*([0-9.eE+-]+)",
                         "max_kld": r"Maximum KLD:\s*([0-9.eE+-]+)",
                         "same_top_pct": r"Same top p:\s*([0-9.eE+-]+)"}.items():
        m = re.search(pattern, text_out)
        stats[key] = float(m.group(1)) if m else None
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", base_out.stdout + base_out.stderr)
    stats["ppl_base_run"] = float(m.group(1)) if m else None
    return stats


def version_line() -> str:
    """What built the binaries: the pinned sdist and llama.cpp's own build number."""
    import re

    res = subprocess.run([str(bin_dir() / "llama-completion"), "--version"], capture_output=True, text=True)
    m = re.search(r"version: (\S+) \(build (\d+), commit (\w+)\)", res.stdout + res.stderr)
    build = f"llama.cpp {m.group(1)}, commit {m.group(3)}" if m else "llama.cpp version unknown"
    return f"llama-cpp-python {VERSION} sdist, {build}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("build", "where"))
    ap.add_argument("-j", "--jobs", type=int, default=None)
    args = ap.parse_args()
    if args.command == "where":
        if not ready():
            raise SystemExit(f"no finished build under {build_dir()}; run: python {sys.argv[0]} build")
        print(bin_dir())
        return
    print(build(args.jobs))


if __name__ == "__main__":
    main()
