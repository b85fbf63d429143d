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
LORA_GROUPS = ("router", "experts", "shared", "attention", "dense_mlp")  # what --lora can adapt
MOE_LORA_GROUPS = ("router", "experts", "shared")  # only an MoE model has them
DEFAULT_LORA_RANK, DEFAULT_LORA_ALPHA, DEFAULT_ROUTE_TARGET_COEF = 8, 16.0, 1.0
# The MLP's learning rate as a multiple of --lr, on both sides of the comparison: an MoE's routed experts, shared
# experts and MLP layers left dense; a dense model's MLP. 0.5 is the recipe that came out ahead of the dense parent
# trained the same way in docs/study.md (k-means router, 144 steps, two seeds pooled, on blocks of 8 documents);
# at 1.0 the MoE was 0.008-0.010 nats behind the parent at 1.0 (96 steps, both seeds), and 0.5 lowered both sides'
# held-out loss. benchmarks/study_defaults.py collects the evidence (docs/study_defaults.json).
DEFAULT_MLP_LR_MULT = 0.5
MLP_GROUPS = ("experts", "shared", "dense_mlp")  # what --mlp-lr-mult scales (the parameter roles of freeze.py)


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
class ExpertSpec:
    """Experts chosen by index: the same ones in every MoE layer, and/or some per layer.

    The grammar of `--train experts:SPEC`, `--force-route SPEC` and `--route-target SPEC` (parse_expert_spec).
    """

    all_layers: tuple[int, ...] = ()  # expert indices chosen in every MoE layer
    by_layer: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (layer, expert indices)

    def __bool__(self) -> bool:
        return bool(self.all_layers or self.by_layer)

    def experts_for(self, layer: int) -> tuple[int, ...] | None:
        """Expert indices chosen in `layer`, or None when the spec names none there."""
        chosen = set(self.all_layers)
        chosen.update(e for lay, es in self.by_layer if lay == layer for e in es)
        return tuple(sorted(chosen)) if chosen else None

    def check(self, option: str, experts_per_layer: dict[int, int]) -> None:
        """UsageError for a layer that is not an MoE layer or an expert a layer does not have.

        experts_per_layer: {MoE layer index: number of routed experts}, from config.json or the loaded model."""
        for lay, es in self.by_layer:
            if lay not in experts_per_layer:
                moe = ", ".join(str(i) for i in sorted(experts_per_layer)) or "none"
                raise UsageError(f"{option}: layer {lay} is not an MoE layer (MoE layers: {moe})")
            bad = [e for e in es if e >= experts_per_layer[lay]]
            if bad:
                raise UsageError(f"{option}: layer {lay} has {experts_per_layer[lay]} experts; no expert {bad[0]}")
        if self.all_layers and experts_per_layer:
            fewest = min(experts_per_layer.values())
            bad = [e for e in self.all_layers if e >= fewest]
            if bad:
                raise UsageError(f"{option}: the model has {fewest} experts per layer; no expert {bad[0]}")


def parse_expert_spec(spec: str, what: str, example: str = "") -> ExpertSpec:
    """'0-3' (those experts in every MoE layer), '0=1,2;5=0-3' (per layer), or a JSON file {"layer": [experts]}
    as `upcycle eval --domain` writes it. `what` starts every error message; `example` prefixes the example."""
    import json

    spec = spec.strip()
    every: set[int] = set()
    by_layer: dict[int, set[int]] = {}
    if spec.lower().endswith(".json"):
        p = Path(spec)
        if not p.is_file():
            raise UsageError(f"{what}: no such file")
        try:
            data = json.loads(p.read_text())
            items = {int(k): [int(e) for e in v] for k, v in data.items()}
        except (ValueError, TypeError, AttributeError):
            raise UsageError(f"{what}: expected a JSON object {{\"layer\": [expert indices]}}") from None
        if not any(items.values()):
            raise UsageError(f"{what}: lists no expert")
        for lay, es in items.items():
            if es:
                by_layer.setdefault(lay, set()).update(es)
    elif "=" in spec:
        for entry in spec.split(";"):
            if not entry.strip():
                continue
            lay, _, es = entry.partition("=")
            if not lay.strip().isdigit() or not es.strip():
                raise UsageError(f"{what}: write LAYER=EXPERTS entries separated by ';', e.g. {example}0=1,2;5=0-3")
            by_layer.setdefault(int(lay), set()).update(_ranges(es, what))
    else:
        every.update(_ranges(spec, what))
    return ExpertSpec(tuple(sorted(every)), tuple((lay, tuple(sorted(es))) for lay, es in sorted(by_layer.items())))


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

    @property
    def experts(self) -> ExpertSpec:
        return ExpertSpec(self.experts_all_layers, self.experts_by_layer)

    def experts_for(self, layer: int) -> tuple[int, ...] | None:
        """Expert indices trained in `layer` by an index list, or None when no list names the layer."""
        return self.experts.experts_for(layer)

    @property
    def touches_router(self) -> bool:
        return self.everything or "router" in self.groups

    @property
    def touches_experts(self) -> bool:
        return self.everything or "experts" in self.groups or self.some_experts


def parse_train(values: list[str], default: tuple[str, ...] = ("all",)) -> TrainSelection:
    """--train values: group names (comma-separated allowed), experts:SPEC, or a JSON file {layer: [experts]}.

    experts:0-3          experts 0..3 of every MoE layer
    experts:0=1,2;5=0-3  experts 1 and 2 of layer 0, 0..3 of layer 5
    domain_experts.json  {"layer": [experts]} as `upcycle eval --domain` writes it

    No value: `default` (all; nothing beside the adapters in a LoRA run).
    """
    groups: set[str] = set()
    every: set[int] = set()
    by_layer: dict[int, set[int]] = {}
    for value in values or list(default):
        value = value.strip()
        if value.lower().endswith(".json") or value.startswith("experts:"):
            spec = parse_expert_spec(value.removeprefix("experts:"), f"--train {value}", example="experts:")
            every.update(spec.all_layers)
            for lay, es in spec.by_layer:
                by_layer.setdefault(lay, set()).update(es)
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
    mlp_lr_mult: float = DEFAULT_MLP_LR_MULT  # every MLP weight's learning rate = lr x this (MLP_GROUPS)
    expert_lr_mult: float | None = field(default=None, repr=False)  # the old name of mlp_lr_mult (an alias)
    # domain experts: forced routing and router steering (MoE only); SPEC = the grammar of --train experts:SPEC
    force_route: str | None = None  # every training token goes to these experts (the rest of top-k: the router's)
    route_target: str | None = None  # cross-entropy of the router's distribution toward these experts
    route_target_coef: float = DEFAULT_ROUTE_TARGET_COEF
    # what trains
    train: tuple[str, ...] | None = None  # None or empty: all (with --lora: only the adapters)
    lora: tuple[str, ...] | None = None  # groups adapted with LoRA through PEFT ("router,experts" allowed)
    lora_rank: int = DEFAULT_LORA_RANK
    lora_alpha: float = DEFAULT_LORA_ALPHA
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
    force_spec: ExpertSpec = field(init=False, repr=False, compare=False)  # parsed from `force_route`
    target_spec: ExpertSpec = field(init=False, repr=False, compare=False)  # parsed from `route_target`

    def __post_init__(self):
        """Raise UsageError for any invalid or contradictory option; normalise and derive the rest."""
        set_ = functools.partial(object.__setattr__, self)
        set_("out", Path(self.out))
        set_("tokens", parse_count(self.tokens, "--tokens"))
        set_("model", str(self.model))
        set_("data", (str(self.data),) if isinstance(self.data, (str, Path)) else tuple(str(d) for d in self.data or ()))
        set_("lora", _lora_groups(self.lora))
        set_("train", tuple(self.train or (() if self.lora else ("all",))))
        if self.expert_lr_mult is not None:
            if self.mlp_lr_mult not in (DEFAULT_MLP_LR_MULT, self.expert_lr_mult):
                raise UsageError("--expert-lr-mult is the old name of --mlp-lr-mult: give one of them")
            set_("mlp_lr_mult", self.expert_lr_mult)
            set_("expert_lr_mult", None)
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
        for name in ("weight_decay", "grad_clip", "aux_loss_coef", "z_loss_coef", "router_lr_mult", "mlp_lr_mult"):
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
        set_("selection", parse_train(list(self.train), default=()))
        self._check_domain_options()
        if self.router_lr_mult != 1.0 and not self.trains_router:
            raise UsageError("--router-lr-mult is set but --train does not train the router")
        if self.mlp_lr_mult != DEFAULT_MLP_LR_MULT and not self.trains_mlp:
            raise UsageError("--mlp-lr-mult is set but nothing of the MLP trains (--train experts, shared, dense_mlp "
                             "or --lora on them)")
        if self.report_to != "none":
            _check_tracker(self.report_to)

    def _check_domain_options(self) -> None:
        """--force-route, --route-target and --lora: their specs, and how they combine with the rest."""
        set_ = functools.partial(object.__setattr__, self)
        set_("force_spec", parse_expert_spec(self.force_route, f"--force-route {self.force_route}")
             if self.force_route is not None else ExpertSpec())
        set_("target_spec", parse_expert_spec(self.route_target, f"--route-target {self.route_target}")
             if self.route_target is not None else ExpertSpec())
        if self.force_route is not None and not self.force_spec:
            raise UsageError("--force-route names no expert")
        if self.route_target is not None and not self.target_spec:
            raise UsageError("--route-target names no expert")
        if self.force_route is not None and self.capacity_factor is not None:
            raise UsageError("--force-route and --capacity-factor cannot be combined: a forced expert takes every "
                             "token, so a capacity would drop most of them")
        if not (self.route_target_coef > 0 and math.isfinite(self.route_target_coef)):
            raise UsageError(f"--route-target-coef {self.route_target_coef:g} must be positive")
        if self.route_target_coef != DEFAULT_ROUTE_TARGET_COEF and self.route_target is None:
            raise UsageError("--route-target-coef is set but --route-target names no expert")
        if self.route_target is not None and not self.trains_router:
            raise UsageError("--route-target steers the router, but it does not train: add --train router "
                             "(or --lora router)")
        if self.lora_rank < 1:
            raise UsageError(f"--lora-rank {self.lora_rank} must be at least 1")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise UsageError(f"--lora-alpha {self.lora_alpha:g} must be positive")
        if not self.lora:
            if self.lora_rank != DEFAULT_LORA_RANK or self.lora_alpha != DEFAULT_LORA_ALPHA:
                raise UsageError("--lora-rank and --lora-alpha are set but --lora names no group to adapt")
            return
        sel = self.selection
        if sel.everything:
            raise UsageError("--train all trains every weight fully; with --lora, --train names only the groups "
                             "that train fully beside the adapters (e.g. --train router)")
        both = [g for g in self.lora if g in sel.groups or (g == "experts" and sel.some_experts)]
        if both:
            raise UsageError(f"--train and --lora both name {both[0]}: a group trains either fully or through "
                             "LoRA adapters")

    # -- derived

    @property
    def trains_mlp(self) -> bool:
        """Some MLP weight changes (MLP_GROUPS, trained fully or adapted with LoRA): --mlp-lr-mult applies."""
        sel = self.selection
        return (sel.everything or sel.touches_experts or bool(sel.groups & set(MLP_GROUPS))
                or any(g in MLP_GROUPS for g in self.lora or ()))

    @property
    def trains_router(self) -> bool:
        """The routers change: trained fully, or adapted with LoRA."""
        return self.selection.touches_router or "router" in (self.lora or ())

    def lora_json(self) -> dict | None:
        """The LoRA options as a checkpoint records them (a resume must give the same), None without --lora."""
        if not self.lora:
            return None
        return {"groups": list(self.lora), "rank": self.lora_rank, "alpha": self.lora_alpha}

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
        if self.force_route is not None:
            used.append("--force-route")
        if self.route_target is not None:
            used.append("--route-target")
        moe_lora = [g for g in self.lora or () if g in MOE_LORA_GROUPS]
        if moe_lora:
            used.append("--lora " + ",".join(moe_lora))
        return used

    def check_model(self, model_type: str, is_moe: bool, has_selection_bias: bool, layout=None) -> None:
        """Contradictions between the options and the model, raised before the weights are loaded.

        layout (upcycle.train.model.MoELayout, read from config.json): where the MoE layers are and how many
        experts they have, to check the expert specs and the LoRA groups; None skips those checks."""
        if not is_moe:
            used = self.uses_routing_controls()
            if used:
                raise UsageError(f"{', '.join(used)} only apply to a Mixture-of-Experts model; {self.model} is a "
                                 f"dense {model_type} model")
        if layout is not None and is_moe:
            experts = layout.experts_per_layer
            self.selection.experts.check("--train", experts)
            self.force_spec.check(f"--force-route {self.force_route}", experts)
            self.target_spec.check(f"--route-target {self.route_target}", experts)
            if "shared" in (self.lora or ()) and not layout.shared_width:
                raise UsageError(f"--lora shared: {self.model} has no shared expert")
            if "dense_mlp" in (self.lora or ()) and len(layout.moe_layers) == layout.num_layers:
                raise UsageError(f"--lora dense_mlp: every layer of {self.model} is an MoE layer; it has no dense MLP")
        if self.aux_free_bias and not has_selection_bias:
            from upcycle.families.moe import MOE_TYPES

            biased = ", ".join(t for t, entry in MOE_TYPES.items() if entry.selection_bias)
            raise UsageError(f"--aux-free-bias needs a model type that stores a selection bias "
                             f"({biased}); {self.model} is {model_type}")

    def to_json(self) -> dict:
        d = asdict(self)
        for derived in ("selection", "force_spec", "target_spec", "expert_lr_mult"):
            d.pop(derived, None)
        d["out"] = str(self.out)
        d["data"], d["train"] = list(self.data), list(self.train)
        d["lora"] = list(self.lora) if self.lora else None
        d["adam_betas"] = list(self.adam_betas)
        return d


def _lora_groups(value) -> tuple[str, ...] | None:
    """--lora values (repeatable, comma-separated) -> the groups in LORA_GROUPS order; None for none."""
    if value is None:
        return None
    names = []
    for item in [value] if isinstance(value, str) else value:
        names += [n.strip().lower() for n in str(item).split(",") if n.strip()]
    for name in names:
        if name not in LORA_GROUPS:
            raise UsageError(f"--lora {name!r}: use {', '.join(LORA_GROUPS)} (comma-separated)")
    if not names:
        raise UsageError(f"--lora names no group: use {', '.join(LORA_GROUPS)} (comma-separated)")
    return tuple(g for g in LORA_GROUPS if g in names)


def _check_tracker(name: str) -> None:
    import importlib.util

    need = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}[name]
    if not any(importlib.util.find_spec(m) for m in need):
        raise UsageError(f"--report-to {name} needs the {need[0]} package: pip install {need[0]}")
