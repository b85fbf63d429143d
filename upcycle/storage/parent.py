"""Opening a dense parent for conversion: a Hugging Face folder, a .gguf file, or a hub id.

Only metadata is read here (config, tensor headers); tensors are read later, one at a time, by the plan.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from upcycle.families.parents import ARCHS, ParentSpec, parse_parent_config, supported_parents
from upcycle.core.errors import InputError, UnsupportedError
from upcycle.core.paths import hub_offline, is_hub_id
from upcycle.storage.sources import GGUFSource, PickleSource, SafetensorsSource, TensorSource

# Files that travel unchanged from the parent to the MoE folder.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json", "generation_config.json",
)


@dataclass
class ParentCheckpoint:
    spec: ParentSpec
    source: TensorSource
    label: str  # what the user passed
    folder: Path  # the local folder (hub snapshot, the GGUF file's folder, or the given folder)
    gguf: Path | None = None

    @property
    def load_spec(self) -> str:
        """What upcycle.core.loading.load_causal_lm needs to load this parent as a whole model (for verification)."""
        return str(self.gguf or self.folder)

    def copy_tokenizer(self, dst: Path) -> list[str]:
        """Tokenizer and generation config into dst: copied byte for byte, or (GGUF) rebuilt by transformers."""
        if self.gguf is not None:
            from upcycle.core.loading import load_tokenizer

            tok = load_tokenizer(self.gguf)
            tok.save_pretrained(dst)
            return sorted(p.name for p in dst.iterdir() if p.name in TOKENIZER_FILES)
        copied = []
        for name in TOKENIZER_FILES:
            src = self.folder / name
            if src.is_file():
                shutil.copyfile(src, dst / name)
                copied.append(name)
        return copied

    def close(self) -> None:
        self.source.close()


def _gguf_config(path: Path) -> dict:
    try:
        from transformers import AutoConfig
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as exc:  # pragma: no cover
        raise InputError(f"reading GGUF files needs transformers and gguf: {exc}") from None
    try:
        cfg = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    except ImportError:
        raise InputError("reading GGUF files needs the gguf package: pip install 'upcycle[gguf]'") from None
    except (ValueError, KeyError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "not supported" in msg:
            raise UnsupportedError(f"{path}: {msg}; supported parents: {supported_parents()}") from None
        raise InputError(f"{path} is not a readable GGUF model: {msg}") from None
    model_type = cfg.get("model_type")
    if model_type not in ARCHS:
        raise UnsupportedError(f"{path}: cannot upcycle GGUF architecture {model_type!r}; supported parents: {supported_parents()}")
    cfg = {k: v for k, v in cfg.items() if k != "model_type"}
    # transformers fills in what the GGUF metadata leaves out, exactly as it will when it loads the file.
    return AutoConfig.for_model(model_type, **cfg).to_dict()


def _hub_snapshot(repo: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - a transformers dependency
        raise InputError(f"{repo} is not a local path, and huggingface_hub is not installed") from None
    # weights as safetensors only, and never code: supported families need none
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        why = "the hub is offline (HF_HUB_OFFLINE) and it is not cached" if hub_offline() else str(exc).splitlines()[0]
        raise InputError(f"{repo} is not a local path and could not be fetched from the hub: {why}") from None


def open_parent(spec: str | Path, *, allow_pickle: bool = False) -> ParentCheckpoint:
    label = str(spec)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise InputError(f"no such GGUF file: {path}")
        cfg = _gguf_config(path)
        parent = parse_parent_config(cfg, where=str(path))
        source = GGUFSource(path, permute_qk=parent.arch.gguf_permute_qk, num_heads=parent.num_heads,
                            num_kv_heads=parent.num_kv_heads, fused_gate_up=parent.arch.fused_gate_up)
        return ParentCheckpoint(parent, source, label, path.parent, gguf=path)
    if not path.exists():
        if is_hub_id(label):
            path = _hub_snapshot(label)
        else:
            raise InputError(f"no such file or folder: {path}")
    if not path.is_dir():
        raise InputError(f"{path} is neither a model folder nor a .gguf file")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise InputError(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{cfg_file} is not valid JSON") from None
    parent = parse_parent_config(cfg, where=str(path))
    if any(path.glob("*.safetensors")):
        source: TensorSource = SafetensorsSource(path)
    elif any(path.glob("*.bin")):
        if not allow_pickle:
            raise InputError(
                f"{path} holds only PyTorch pickle weights (.bin), which can run code when loaded; convert them to "
                "safetensors, or pass --allow-pickle if you trust the files"
            )
        source = PickleSource(path)
    else:
        raise InputError(f"{path} holds no weights (*.safetensors)")
    return ParentCheckpoint(parent, source, label, path)
