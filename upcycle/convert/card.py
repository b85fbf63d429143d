"""The machine-readable recipe (upcycle.json) and the model card (README.md) of a converted folder.

upcycle.json holds everything needed to reproduce the bytes (tool version, every option, the seed) and to
trace each expert back to the parent: which intermediate neurons it was cut from, the factor on its down_proj,
and which of its neurons Drop-Upcycling re-drew. `upcycle eval` reads it to measure how far experts moved.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from upcycle import __version__
from upcycle.core.tensors import NAME_OF, human_bytes, human_count
from upcycle.families.moe import ROUTINGS

MANIFEST = "upcycle.json"


def _neurons(a: np.ndarray) -> dict | list:
    """A contiguous range as {start, stop}; anything else as the explicit list."""
    a = np.asarray(a)
    if a.size and np.array_equal(a, np.arange(a[0], a[0] + a.size)):
        return {"start": int(a[0]), "stop": int(a[0] + a.size)}
    return a.astype(int).tolist()


def _expand(n: dict | list) -> list[int]:
    if isinstance(n, dict):
        return list(range(n["start"], n["stop"]))
    return list(n)


# ------------------------------------------------------------------------------------------------ fingerprints
# What makes `upcycle eval` honest about provenance: a digest of the parent's tensors (is --parent the model this
# MoE came from?) and of the MoE's own tensors as written (has it been trained since?). A digest covers every
# tensor in name order as float32 values, so the same weights stored in bf16 and in fp32, or sharded differently,
# give the same digest. The output head is left out: writers store a tied head differently (or not at all).


DIGEST_WINDOW = 4096  # elements read at the start, middle and end of each tensor


def tensor_digest(source) -> str:
    """sha256 over (name, shape, float32 values of three windows) of every tensor of a TensorSource.

    Three windows of DIGEST_WINDOW elements per tensor instead of all of it: the digest then reads a few MB of a
    multi-GB checkpoint (convert stays near the speed of a copy, which reading everything back would double),
    and it still changes whenever training touched a tensor, because AdamW (decoupled weight decay included)
    moves every element of a tensor it updates. It is a fingerprint for provenance, not a checksum of the files.
    """
    import hashlib

    h = hashlib.sha256()
    for name in sorted(source.names()):
        if name == "lm_head.weight":
            continue
        meta = source.meta(name)
        h.update(f"{name}:{list(meta.shape)}:".encode())
        for window in _windows(source, name, meta):
            h.update(np.ascontiguousarray(window).tobytes())
    return h.hexdigest()


def _windows(source, name: str, meta) -> list[np.ndarray]:
    """The float32 values at the start, middle and end of a tensor (all of it when it is small)."""
    import os

    from upcycle.core.tensors import FLOAT_CODES, STORAGE, to_f32

    n = int(np.prod(meta.shape)) if meta.shape else 1
    w = DIGEST_WINDOW
    starts = [0] if n <= 3 * w else [0, (n - w) // 2, n - w]
    size = n if n <= 3 * w else w
    item = STORAGE[meta.dtype].itemsize
    where = source.byte_range(name)
    out = []
    if where is not None:
        path, offset, _ = where
        fd = os.open(path, os.O_RDONLY)
        try:
            for s0 in starts:
                raw = os.pread(fd, size * item, offset + s0 * item)
                out.append(np.frombuffer(raw, dtype=STORAGE[meta.dtype]))
        finally:
            os.close(fd)
    else:
        flat = source.read(name).reshape(-1)
        out = [flat[s0:s0 + size] for s0 in starts]
    return [to_f32(a, meta.dtype) if meta.dtype in FLOAT_CODES else a for a in out]


def folder_digest(folder: str | Path) -> str:
    """tensor_digest of a folder of safetensors files (a converted or trained MoE, a dense parent)."""
    from upcycle.convert.sources import SafetensorsSource

    src = SafetensorsSource(Path(folder))
    try:
        return tensor_digest(src)
    finally:
        src.close()


def model_digest(spec: str | Path, allow_pickle: bool = False) -> str | None:
    """tensor_digest of a model as `upcycle convert` reads a parent (folder, .gguf, ...), so that the digest of a dense
    parent equals the one its MoE's upcycle.json records; for a folder convert cannot read as a parent (an MoE), the
    folder_digest of its safetensors files; None when neither works."""
    from upcycle.convert.parent import open_parent
    from upcycle.core.errors import UpcycleError

    try:
        ckpt = open_parent(spec, allow_pickle=allow_pickle)
    except UpcycleError:
        p = Path(spec)
        if p.is_dir() and any(p.glob("*.safetensors")):
            return folder_digest(p)
        return None
    try:
        return tensor_digest(ckpt.source)
    finally:
        ckpt.close()


def manifest_dict(plan, parent_label: str, command: list[str] | None, verification: dict | None,
                  fingerprints: dict | None = None) -> dict:
    """fingerprints: {"parent": tensor_digest of the parent, "weights": folder_digest of the written MoE}."""
    fp = fingerprints or {}
    r = plan.recipe
    layers = []
    for lay in plan.layouts:
        entry: dict = {"index": lay.index, "moe": lay.moe}
        if lay.moe:
            entry["experts"] = [
                {"neurons": _neurons(o.neurons), "down_scale": o.down_scale,
                 **({"source": o.source} if o.source is not None else {}),
                 **({"reinit": o.reinit.astype(int).tolist()} if o.reinit is not None else {})}
                for o in lay.experts
            ]
            if lay.shared is not None:
                entry["shared"] = {"neurons": _neurons(lay.shared.neurons), "down_scale": lay.shared.down_scale,
                                   "copies": lay.shared.copies}
        layers.append(entry)
    return {
        "tool": "upcycle",
        "version": __version__,
        "command": command,
        "parent": {"source": parent_label, "model_type": plan.parent.model_type,
                   "intermediate_size": plan.parent.intermediate_size, "num_layers": plan.parent.num_layers,
                   "tensors_sha256": fp.get("parent")},
        "weights_sha256": fp.get("weights"),
        "recipe": asdict(r),
        # --router-init kmeans: which text the centroids came from (the built-in sample depends on the Python version)
        **({"router_init_sample": fp["router_init_sample"]} if fp.get("router_init_sample") else {}),
        "format": plan.fmt.model_type,
        "dtype": NAME_OF[plan.out_dtype],
        "moe_layers": plan.moe_layers,
        "virtual_group_size": r.group_size,
        # glm4_moe / dots1 apply the group scale through routed_scaling_factor instead of down_proj
        "routed_scaling_factor": plan.config.get("routed_scaling_factor", 1.0),
        "exact_by_construction": r.exact and (plan.sources is None or plan.sources.all_base),
        # why the start is not the parent's function (None: it is, to float32 noise); verification has the measure
        "not_exact_because": plan.inexact_reason,
        "parameters": {"total": plan.total_params, "active_per_token": plan.active_params, "parent": plan.parent_params},
        "verification": verification,
        # --expert-from: every source as given (an expert's "source" is its position here) and its tensor digest
        **({"sources": fp.get("sources"), "shared_from": plan.sources.shared_from} if plan.sources is not None else {}),
        "layers": layers,
    }


def write_manifest(folder: Path, data: dict) -> None:
    # Long neuron lists on one line each keep the file readable without bloating it.
    (folder / MANIFEST).write_text(json.dumps(data, indent=1) + "\n")


@dataclass
class Manifest:
    data: dict

    @property
    def parent(self) -> str:
        return self.data["parent"]["source"]

    @property
    def parent_digest(self) -> str | None:
        return self.data["parent"].get("tensors_sha256")

    @property
    def weights_digest(self) -> str | None:
        return self.data.get("weights_sha256")

    @property
    def recipe(self) -> dict:
        return self.data["recipe"]

    def _layer(self, layer: int) -> dict:
        for entry in self.data["layers"]:
            if entry["index"] == layer:
                return entry
        raise KeyError(f"layer {layer} is not in the manifest")

    def is_moe(self, layer: int) -> bool:
        return bool(self._layer(layer)["moe"])

    def expert_neurons(self, layer: int, expert: int) -> list[int]:
        return _expand(self._layer(layer)["experts"][expert]["neurons"])

    def expert_down_scale(self, layer: int, expert: int) -> float:
        return float(self._layer(layer)["experts"][expert]["down_scale"])

    def expert_reinit(self, layer: int, expert: int) -> list[int]:
        return list(self._layer(layer)["experts"][expert].get("reinit", []))

    def expert_source(self, layer: int, expert: int) -> str | None:
        """The --expert-from checkpoint an expert's neurons were read from; None: the parent."""
        j = self._layer(layer)["experts"][expert].get("source")
        return None if j is None else self.data["sources"][j]["source"]

    @property
    def mixed(self) -> bool:
        """Some experts come from checkpoints other than the parent (--expert-from)."""
        return any(not s.get("is_parent") for s in self.data.get("sources") or [])

    def shared_neurons(self, layer: int) -> list[int] | None:
        s = self._layer(layer).get("shared")
        return None if s is None else _expand(s["neurons"]) * int(s.get("copies", 1))


def read_manifest(folder: str | Path) -> Manifest | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return Manifest(data) if data.get("tool") == "upcycle" else None


def _why_close(r) -> str:
    if r.expert_init_mode[0] != "copy":
        return "the recipe perturbs the experts on purpose"
    return r.inexact_reason


def _source_rows(plan, fingerprints: dict | None) -> list[str]:
    """Table rows for --expert-from: which experts each source gives (with its digest), where the rest comes from."""
    r, src = plan.recipe, plan.sources
    per = r.copies_per_source * r.group_size
    digests = {e["source"]: e["tensors_sha256"] for e in (fingerprints or {}).get("sources") or []}
    rows = []
    for j, spec in enumerate(src.specs):
        digest = digests.get(spec)
        which = f"expert {j}" if per == 1 else f"experts {j * per}-{(j + 1) * per - 1}"
        rows.append(f"| {which} from | `{spec}`"
                    + (" (the parent itself)" if src.of_spec[j] < 0 else "")
                    + (f", tensors sha256 `{digest[:16]}...`" if digest else "") + " |")
    rows.append(f"| attention, norms, embeddings{', dense MLPs' if len(plan.moe_layers) < plan.parent.num_layers else ''}"
                f"{', shared experts' if r.shared_experts else ''} | {src.shared_from} |")
    return rows


def model_card(plan, parent_label: str, command: list[str] | None, verification: dict | None,
               fingerprints: dict | None = None) -> str:
    r, p, fmt = plan.recipe, plan.parent, plan.fmt
    dense = [i for i in range(p.num_layers) if i not in set(plan.moe_layers)]
    mode, value = r.expert_init_mode
    init = {"copy": "exact copies of the parent MLP",
            "drop": f"Drop-Upcycling: {value:g} of each expert's neurons re-drawn from the parent matrix statistics",
            "noise": f"copies plus Gaussian noise of std {value:g}"}[mode]
    if plan.sources is not None and not plan.sources.all_base:
        init = init.replace("the parent MLP", "the MLPs of their --expert-from sources")
    if verification is None:
        check = "not verified (`--no-verify`)"
    else:
        from upcycle.convert.verify import summary

        check = summary(verification)
    cmd = " ".join(command) if command else f"upcycle convert {parent_label} OUT"
    mixed = plan.sources is not None and not plan.sources.all_base
    if mixed:
        computes = ("does NOT compute what the parent computes: " + plan.sources.inexact_reason
                    + (" (how far it is, on the verification prompts, is in the check below)" if verification
                       else " (not measured: converted with `--no-verify`)"))
    else:
        computes = ("until trained, computes "
                    + ('what the parent computes' if r.exact else 'close to what the parent computes (' + _why_close(r) + ')'))
    lines = [
        "---",
        "library_name: transformers",
        "tags: [moe, mixture-of-experts, upcycling, upcycle]",
        "---",
        "",
        f"# {fmt.model_type} MoE upcycled from `{parent_label}`",
        "",
        f"Made by [upcycle](https://pypi.org/project/upcycle/) {__version__} from a dense {p.model_type} parent. "
        f"It loads with `AutoModelForCausalLM.from_pretrained` (no remote code) and {computes}.",
        "",
        "| | |",
        "|---|---|",
        f"| MoE type | `{fmt.model_type}` ({fmt.architecture}) |",
        f"| routed experts | {r.experts}, top-{r.top_k}, each 1/{r.granularity} of the parent MLP ({p.intermediate_size // r.granularity} wide) |",
        f"| shared experts | {r.shared_experts} |",
        f"| MoE layers | {len(plan.moe_layers)} of {p.num_layers}" + (f" (dense: {dense})" if dense else "") + " |",
        f"| expert init | {init} |",
        f"| router init | {r.router_description} (virtual groups of {r.group_size} tied) |",
        f"| routing | {r.routing}: {ROUTINGS[r.routing]} |",
        f"| parameters | {human_count(plan.total_params)} total, {human_count(plan.active_params)} active per token (parent: {human_count(plan.parent_params)}) |",
        f"| dtype, size | {NAME_OF[plan.out_dtype]}, {human_bytes(plan.output_bytes)} |",
        *(_source_rows(plan, fingerprints) if plan.sources is not None else []),
        f"| check against the parent | {check} |",
        "",
        "Reproduce (same bytes):",
        "",
        f"```\n{cmd}\n```",
        "",
        "The full recipe, with the parent neurons behind every expert, is in `upcycle.json`.",
    ]
    from upcycle.families.moe import portability_notes

    notes = portability_notes(fmt, p, r)
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"
