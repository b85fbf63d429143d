"""Where the evaluated models came from: what `upcycle eval` must know before it may credit upcycling.

- Is `--parent` the model this MoE was converted from? upcycle.json records a digest of the parent's tensors
  (upcycle.storage.manifest.tensor_digest); the given parent is digested the same way and compared.
- Has the MoE been trained since conversion? upcycle.json records a digest of the tensors it wrote; the same
  digest of MODEL's files tells whether they are still those.
- How many tokens each trained model saw, from its run folder (metrics.jsonl) or its checkpoint's
  trainer_state.json, so that an MoE and a dense baseline trained on different budgets are never compared as if
  the budgets were equal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from upcycle.core.errors import InputError
from upcycle.evaluate.runlog import RunLog, find_metrics, read_run

FINAL = "final"
TRAINER_STATE = "trainer_state.json"


def parent_digest(spec: str | Path, allow_pickle: bool = False) -> str | None:
    """The tensor digest of a dense model as `upcycle convert` reads it; None when it cannot be read that way."""
    from upcycle.storage.manifest import model_digest

    return model_digest(spec, allow_pickle=allow_pickle)


def weights_digest(folder: str | Path) -> str | None:
    from upcycle.storage.manifest import folder_digest

    p = Path(folder)
    if not p.is_dir() or not any(p.glob("*.safetensors")):
        return None
    return folder_digest(p)


def run_of(model: str | Path) -> Path | None:
    """The training run a model folder belongs to: the folder itself (it holds metrics.jsonl), or RUN for
    RUN/final and RUN/checkpoint-N."""
    p = Path(model)
    if not p.is_dir():
        return None
    if find_metrics(p):
        return p
    if (p.name == FINAL or p.name.startswith("checkpoint-")) and find_metrics(p.parent):
        return p.parent
    return None


def trained_tokens(model: str | Path, runlog: RunLog | None) -> int | None:
    """Training tokens behind the weights in MODEL: a checkpoint's own trainer state, else the run's last row."""
    p = Path(model)
    state = p / TRAINER_STATE
    if state.is_file():
        try:
            return int(json.loads(state.read_text())["tokens"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            pass
    if runlog is not None:
        tokens = runlog.rows[-1].get("tokens")
        return int(tokens) if isinstance(tokens, (int, float)) else None
    return None


@dataclass
class Baseline:
    """The dense baseline given with --baseline: the model to score and, when known, the run that trained it."""

    model: Path
    run: Path | None
    runlog: RunLog | None

    @property
    def tokens(self) -> int | None:
        return trained_tokens(self.model, self.runlog)


def resolve_baseline(spec: str | Path) -> Baseline:
    """A run folder of `upcycle train PARENT` (its final/ is scored), its final/ or a checkpoint, or any model."""
    p = Path(spec).expanduser()
    if not p.exists():
        raise InputError(f"--baseline: no such file or folder: {p}")
    model = p
    if p.is_dir() and find_metrics(p):
        if (p / FINAL).is_dir():
            model = p / FINAL
        else:
            raise InputError(f"--baseline {p}: the run has no {FINAL}/ folder yet (still training?); pass one of "
                             "its checkpoint-N folders instead")
    run = run_of(model)
    return Baseline(model, run, read_run(run) if run is not None else None)


@dataclass
class Provenance:
    """What is known about where MODEL came from, and the findings that forbid an upcycling claim."""

    recorded_parent: str | None = None  # upcycle.json's parent source
    parent_match: bool | None = None  # --parent is (True) / is not (False) the recorded parent; None: unknown
    parent_check: str | None = None  # how it was decided: "tensor digest" or "recorded source"
    untrained: bool | None = None  # MODEL's tensors are still those convert wrote (None: cannot tell)
    model_tokens: int | None = None
    baseline_tokens: int | None = None
    same_data: bool | None = None  # the MoE's and the baseline's runs used the same data and split
    data_differences: list[str] = field(default_factory=list)
    # every setting in which the baseline was not (or cannot be shown to have been) trained as the MoE was
    baseline_differences: list = field(default_factory=list)  # upcycle.evaluate.fairness.Difference
    split_source: str | None = None  # where the held-out split's seed and fraction came from

    @property
    def tokens_differ(self) -> bool:
        return (self.model_tokens is not None and self.baseline_tokens is not None
                and self.model_tokens != self.baseline_tokens)

    def to_json(self) -> dict:
        return {"recorded_parent": self.recorded_parent, "parent_match": self.parent_match,
                "parent_check": self.parent_check, "untrained_since_conversion": self.untrained,
                "model_tokens": self.model_tokens, "baseline_tokens": self.baseline_tokens,
                "same_data": self.same_data, "data_differences": self.data_differences or None,
                "baseline_differences": [d.to_json() for d in self.baseline_differences] or None,
                "split_from": self.split_source}


def check_parent(prov: Provenance, manifest, parent: str | Path, allow_pickle: bool) -> None:
    prov.recorded_parent = manifest.parent
    recorded = manifest.parent_digest
    if recorded:
        got = parent_digest(parent, allow_pickle)
        if got is not None:
            prov.parent_match, prov.parent_check = got == recorded, "tensor digest"
            return
    # an older manifest (no digest), or a parent that cannot be read tensor by tensor: the recorded source
    try:
        same = Path(str(parent)).expanduser().resolve() == Path(manifest.parent).expanduser().resolve()
    except OSError:
        same = str(parent) == manifest.parent
    prov.parent_match, prov.parent_check = (True, "recorded source") if same else (None, None)


def compare_runs(prov: Provenance, manifest, model_run: Path | None, baseline_run: Path | None,
                 allow_pickle: bool = False) -> None:
    """Fill prov.baseline_differences (upcycle.evaluate.fairness) from the two runs' run.json."""
    from upcycle.evaluate.fairness import read_run_record, training_differences

    diffs = training_differences(
        read_run_record(model_run), read_run_record(baseline_run),
        parent_digest=manifest.parent_digest if manifest is not None else None,
        converted_digest=manifest.weights_digest if manifest is not None else None,
        model_tokens=prov.model_tokens, baseline_tokens=prov.baseline_tokens, allow_pickle=allow_pickle)
    prov.baseline_differences = diffs
    data = [d for d in diffs if d.setting.startswith(("data files", "seed", "held-out fraction", "text field",
                                                      "training run"))]
    prov.data_differences = [d.text() for d in data]
    prov.same_data = None if any(d.unknown for d in data) else not data


def split_settings(run_dir: Path | None) -> dict | None:
    """The held-out split of a training run (run.json): {"seed", "heldout_fraction", "text_field"}."""
    from upcycle.evaluate.fairness import read_run_record

    rec = read_run_record(run_dir)
    if rec is None:
        return None
    cfg = rec["config"]
    return {"seed": cfg.get("seed", 0), "heldout_fraction": cfg.get("heldout_fraction", 0.01),
            "text_field": cfg.get("text_field")}


def resolve_model(spec: str | Path) -> tuple[str, Path | None]:
    """MODEL as `upcycle eval` takes it: a run folder of `upcycle train` means its final/ (and the run), like
    --baseline RUN; anything else is scored as given."""
    p = Path(spec).expanduser()
    if p.is_dir() and find_metrics(p) and not any(p.glob("*.safetensors")):
        if (p / FINAL).is_dir():
            return str(p / FINAL), p
        raise InputError(f"MODEL {p}: the run has no {FINAL}/ folder yet (still training?); pass one of its "
                         "checkpoint-N folders instead")
    return str(spec), None
