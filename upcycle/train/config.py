"""The options of one training run, as a typed dataclass that validates itself before any compute is spent.

A TrainConfig is frozen and checks in __post_init__ what can be checked from the options alone, so an invalid
one cannot exist; `check_model()` checks what needs the model's type (MoE-only options on a dense model,
aux-loss-free balancing without a selection bias). `precision="auto"` stays "auto" here: train() resolves it
for the device it runs on. An option is one field here plus one typer option in upcycle/cli/train.py.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from upcycle.core.errors import UsageError
from upcycle.core.tensors import FLOAT_DTYPES

PRECISIONS = ("auto", "bf16", "fp32")
EXPERTS_IMPLS = ("auto", "upcycle", "grouped_mm", "batched_mm", "eager")
TRACKERS = ("none", "tensorboard", "wandb")
SAVE_DTYPES = ("auto", *FLOAT_DTYPES)
GROUPS = ("all", "router", "experts", "shared", "attention", "embeddings", "norms", "dense_mlp")


def parse_count(text: str | int | None, what: str) -> int | None:
    """'20M' -> 20_000_000, '1.5B' -> 1_500_000_000, '4096' -> 4096 (token budgets)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", str(text))
    if not m:
        raise UsageError(f"{what} {text!r}: expected a number like 500000, 20M or 1.5B")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}[m.group(2).lower()]
    return int(round(value))


def _ranges(spec: str, what: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise UsageError(f"{what}: {part!r} is not an index or a range like 2-5")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise UsageError(f"{what}: empty range {part!r}")
        out.extend(range(a, b + 1))
    return sorted(set(out))


@dataclass(frozen=True)
class TrainSelection:
    """What trains: named parameter groups, plus experts by index (None: every layer's)."""

    groups: frozenset[str]
    experts_all_layers: tuple[int, ...] = ()  # expert indices trained in every MoE layer
    experts_by_layer: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (layer, expert indices)

    @property
    def everything(self) -> bool:
        return "all" in self.groups

    @property
    def some_experts(self) -> bool:
        return bool(self.experts_all_layers or self.experts_by_layer)

    def experts_for(self, layer: int) -> tuple[int, ...] | None:
        """Expert indices trained in `layer` by an index list, or None when no list names the layer."""
        chosen = set(self.experts_all_layers)
        chosen.update(e for lay, es in self.experts_by_layer if lay == layer for e in es)
        if not chosen:
            return None
        return tuple(sorted(chosen))

    @property
    def touches_router(self) -> bool:
        return self.everything or "router" in self.groups


def parse_train(values: list[str]) -> TrainSelection:
    """--train values: group names (comma-separated allowed), experts:SPEC, or a JSON file {layer: [experts]}.

    experts:0-3          experts 0..3 of every MoE layer
    experts:0=1,2;5=0-3  experts 1 and 2 of layer 0, 0..3 of layer 5
    domain_experts.json  {"layer": [experts]} as `upcycle eval --domain` writes it
    """
    import json

    groups: set[str] = set()
    every: set[int] = set()
    by_layer: dict[int, set[int]] = {}
    for value in values or ["all"]:
        value = value.strip()
        if value.lower().endswith(".json"):
            p = Path(value)
            if not p.is_file():
                raise UsageError(f"--train {value}: no such file")
            try:
                data = json.loads(p.read_text())
                items = {int(k): [int(e) for e in v] for k, v in data.items()}
            except (ValueError, TypeError, AttributeError):
                raise UsageError(f"--train {value}: expected a JSON object {{\"layer\": [expert indices]}}") from None
            if not any(items.values()):
                raise UsageError(f"--train {value}: lists no expert")
            for lay, es in items.items():
                by_layer.setdefault(lay, set()).update(es)
            continue
        if value.startswith("experts:"):
            spec = value[len("experts:"):]
            if "=" in spec:
                for entry in spec.split(";"):
                    if not entry.strip():
                        continue
                    lay, _, es = entry.partition("=")
                    if not lay.strip().isdigit() or not es.strip():
                        raise UsageError(f"--train {value}: write LAYER=EXPERTS entries separated by ';', e.g. experts:0=1,2;5=0-3")
                    by_layer.setdefault(int(lay), set()).update(_ranges(es, f"--train {value}"))
            else:
                every.update(_ranges(spec, f"--train {value}"))
            continue
        for name in value.split(","):
            name = name.strip().lower()
            if name not in GROUPS:
                raise UsageError(f"--train {name!r}: use {', '.join(GROUPS)}, experts:INDICES or a JSON file")
            groups.add(name)
    if "all" in groups and (len(groups) > 1 or every or by_layer):
        raise UsageError("--train all trains everything; it cannot be combined with other groups")
    if "experts" in groups and (every or by_layer):
        raise UsageError("--train experts trains every expert; drop it or the expert index list")
    return TrainSelection(frozenset(groups), tuple(sorted(every)),
                          tuple((lay, tuple(sorted(es))) for lay, es in sorted(by_layer.items())))


@dataclass(frozen=True)
class TrainConfig:
    model: str
    data: tuple[str, ...]  # a list is accepted and stored as a tuple
    out: Path
    steps: int | None = None
    tokens: int | None = None  # also "20M", "1.5B": parsed on construction
    seq_len: int = 1024
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # None: 2% of the steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    save_every: int = 500
    keep_checkpoints: int = 0  # 0: keep all
    resume: bool = False
    seed: int = 0
    # routing
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    router_jitter: float = 0.0
    capacity_factor: float | None = None  # None: dropless
    aux_free_bias: bool = False
    bias_update_rate: float = 1e-3
    router_lr_mult: float = 1.0
    # what trains
    train: tuple[str, ...] | None = ("all",)  # None or empty: all
    # numerics and speed
    precision: str = "auto"  # resolved by train(): bf16 where the device runs it natively, else fp32
    gradient_checkpointing: bool = False
    experts_impl: str = "auto"
    # data
    text_field: str | None = None
    heldout_fraction: float = 0.01
    eval_every: int | None = None  # None: at every checkpoint when the held-out split has a block; 0: never
    eval_blocks: int = 16
    # output
    report_to: str = "none"
    save_dtype: str = "auto"
    allow_pickle: bool = False
    dry_run: bool = False  # print the memory estimate and trainable parameters, load no weights
    selection: TrainSelection = field(init=False, repr=False, compare=False)  # parsed from `train`

    def __post_init__(self):
        """Raise UsageError for any invalid or contradictory option; normalise and derive the rest."""
        set_ = functools.partial(object.__setattr__, self)
        set_("out", Path(self.out))
        set_("tokens", parse_count(self.tokens, "--tokens"))
        set_("model", str(self.model))
        set_("data", (str(self.data),) if isinstance(self.data, (str, Path)) else tuple(str(d) for d in self.data or ()))
        set_("train", tuple(self.train or ("all",)))
        if not self.data:
            raise UsageError("give training text with --data (files, folders or globs)")
        if (self.steps is None) == (self.tokens is None):
            raise UsageError("give exactly one budget: --steps N or --tokens N")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"--steps {self.steps} must be at least 1")
        if self.tokens is not None and self.tokens < 1:
            raise UsageError(f"--tokens {self.tokens} must be at least 1")
        for name in ("seq_len", "batch_size", "grad_accum", "eval_blocks"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least 1")
        if self.seq_len < 2:
            raise UsageError("--seq-len must be at least 2 (a block predicts its own next tokens)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr {self.lr:g} must be a positive number")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UsageError(f"--min-lr-ratio {self.min_lr_ratio:g} must be between 0 and 1")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise UsageError(f"--warmup-steps {self.warmup_steps} must not be negative")
        for name in ("weight_decay", "grad_clip", "aux_loss_coef", "z_loss_coef", "router_lr_mult"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise UsageError(f"--{name.replace('_', '-')} {v:g} must be zero or positive")
        if self.save_every < 0 or self.keep_checkpoints < 0:
            raise UsageError("--save-every and --keep-checkpoints must not be negative")
        if not 0.0 <= self.router_jitter < 1.0:
            raise UsageError(f"--router-jitter {self.router_jitter:g} must be in [0, 1)")
        if self.capacity_factor is not None and not (self.capacity_factor > 0 and math.isfinite(self.capacity_factor)):
            raise UsageError(f"--capacity-factor {self.capacity_factor:g} must be positive (leave it out for dropless)")
        if not self.bias_update_rate > 0:
            raise UsageError(f"--bias-update-rate {self.bias_update_rate:g} must be positive")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise UsageError(f"--heldout-fraction {self.heldout_fraction:g} must be in [0, 1)")
        if self.eval_every is not None and self.eval_every < 0:
            raise UsageError(f"--eval-every {self.eval_every} must not be negative")
        if self.eval_every and self.heldout_fraction == 0:
            raise UsageError("--eval-every needs a held-out split: --heldout-fraction must be above 0")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r}: use auto, bf16 or fp32 (fp16 needs loss "
                             "scaling and is not offered; bf16 has fp32's range)")
        if self.experts_impl not in EXPERTS_IMPLS:
            raise UsageError(f"--experts-impl {self.experts_impl!r}: use {', '.join(EXPERTS_IMPLS)}")
        if self.report_to not in TRACKERS:
            raise UsageError(f"--report-to {self.report_to!r}: use {', '.join(TRACKERS)}")
        if self.save_dtype not in SAVE_DTYPES:
            raise UsageError(f"--save-dtype {self.save_dtype!r}: use {', '.join(SAVE_DTYPES)}")
        set_("selection", parse_train(list(self.train)))
        if self.router_lr_mult != 1.0 and not self.selection.touches_router:
            raise UsageError("--router-lr-mult is set but --train does not train the router")
        if self.report_to != "none":
            _check_tracker(self.report_to)

    # -- derived

    def tokens_per_step(self, world_size: int) -> int:
        return self.seq_len * self.batch_size * self.grad_accum * world_size

    def total_steps(self, world_size: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.tokens / self.tokens_per_step(world_size)))

    def warmup(self, total: int) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total)
        return max(1, round(0.02 * total)) if total > 1 else 0

    def uses_routing_controls(self) -> list[str]:
        """The MoE-only options that were set, by flag name."""
        used = []
        if self.router_jitter:
            used.append("--router-jitter")
        if self.capacity_factor is not None:
            used.append("--capacity-factor")
        if self.aux_free_bias:
            used.append("--aux-free-bias")
        if self.router_lr_mult != 1.0:
            used.append("--router-lr-mult")
        sel = self.selection
        if sel.groups & {"router", "experts", "shared"} or sel.some_experts:
            used.append("--train " + ",".join(sorted(sel.groups & {"router", "experts", "shared"}) or ["experts:..."]))
        return used

    def check_model(self, model_type: str, is_moe: bool, has_selection_bias: bool) -> None:
        """Contradictions between the options and the model, raised before the weights are loaded."""
        if not is_moe:
            used = self.uses_routing_controls()
            if used:
                raise UsageError(f"{', '.join(used)} only apply to a Mixture-of-Experts model; {self.model} is a "
                                 f"dense {model_type} model")
        if self.aux_free_bias and not has_selection_bias:
            from upcycle.families.moe import MOE_TYPES

            biased = ", ".join(t for t, entry in MOE_TYPES.items() if entry.selection_bias)
            raise UsageError(f"--aux-free-bias needs a model type that stores a selection bias "
                             f"({biased}); {self.model} is {model_type}")

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("selection", None)
        d["out"] = str(self.out)
        d["data"], d["train"] = list(self.data), list(self.train)
        d["adam_betas"] = list(self.adam_betas)
        return d


def _check_tracker(name: str) -> None:
    import importlib.util

    need = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}[name]
    if not any(importlib.util.find_spec(m) for m in need):
        raise UsageError(f"--report-to {name} needs the {need[0]} package: pip install {need[0]}")
