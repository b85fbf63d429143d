"""The upcycling recipe: the MoE shape the user asked for (upcycle.families.moe.shape.MoEShape: experts, top-k,
granularity, shared experts, routing rule) plus how convert initialises it (output type, layers, router and expert
init, slice order, seed, dtype, expert sources), validated when it is made."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from upcycle.core.errors import UsageError
from upcycle.core.layers import parse_layers
from upcycle.core.tensors import FLOAT_DTYPES
from upcycle.families.moe import format_names
from upcycle.families.moe.shape import MoEShape

FORMATS = format_names()
DTYPES = ("auto", *FLOAT_DTYPES)
# How the MLP's neurons are grouped into slices (upcycle.convert.partition): in their order, a seeded permutation,
# balanced k-means of the neurons' gate_proj rows, or balanced k-means of their activations on sample text
SLICE_ORDERS = ("contiguous", "random", "cluster", "coactivation")


@dataclass(frozen=True)
class Recipe(MoEShape):
    format: str = "auto"
    moe_layers: str = "all"
    router_init: str = "auto"
    router_std: float = 0.02
    expert_init: str = "copy"
    slice_order: str = "contiguous"
    seed: int = 0
    dtype: str = "auto"
    expert_from: tuple[str, ...] = ()  # checkpoints whose MLPs become the experts (empty: the parent's)
    average_shared: bool = False  # non-expert weights: the mean over the parent and the sources (BTX)

    def __post_init__(self):
        sources = () if self.expert_from is None else (self.expert_from,) if isinstance(self.expert_from, (str, Path)) \
            else self.expert_from
        object.__setattr__(self, "expert_from", tuple(str(s) for s in sources))
        if any(not s.strip() for s in self.expert_from):
            raise UsageError("--expert-from needs a checkpoint (a folder or a .gguf file), not an empty string")
        self._check_counts()
        if self.format not in FORMATS:
            raise UsageError(f"unknown --format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.dtype not in DTYPES:
            raise UsageError(f"unknown --dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.slice_order not in SLICE_ORDERS:
            raise UsageError(f"unknown --slice-order {self.slice_order!r}; choose {', '.join(SLICE_ORDERS)}")
        self._check_routing()
        if not self.router_std >= 0:
            raise UsageError("--router-std must be 0 (a zero router) or positive")
        self.expert_init_mode  # noqa: B018 - parse now so errors come before any work
        self.router_init_mode  # noqa: B018
        if self.router_std == 0 and self.routing == "renorm" and not self.partition:
            raise UsageError("--router-std 0 with --routing renorm: identical experts then give the zero router no "
                             "gradient, so it never leaves zero; use --routing softmax or sigmoid, or a positive --router-std")
        if self.router_std == 0 and self.router_init_mode[0] != "random" and self.router_init != "auto":
            mode = self.router_init_mode[0]
            what = {"kmeans": "centroids", "fit": "a fit to the parent's activations"}.get(mode, "the texts of each source")
            raise UsageError(f"--router-std 0 asks for a zero router, --router-init {mode} sets it from {what}; "
                             "drop one of them")
        self._check_groups()
        self._check_sources()
        self._check_partition()

    def _check_partition(self) -> None:
        mode = self.router_init_mode[0]
        if self.slice_order in ("cluster", "coactivation") and self.granularity == 1:
            raise UsageError(f"--slice-order {self.slice_order} groups the MLP's neurons into --granularity slices; "
                             "with --granularity 1 there is one slice: give --granularity 2 or more")
        if not self.partition:
            if mode == "fit":
                raise UsageError(f"--router-init fit fits one router row per expert of a partition (one MLP copy cut "
                                 f"into --experts {self.group_size} with --top-k below it); --experts {self.experts} "
                                 f"--top-k {self.top_k} makes whole copies, which it cannot tell apart: use kmeans or "
                                 "random")
            return
        if self.expert_from:
            raise UsageError("a partition cuts the parent's own MLP into experts; --expert-from takes whole MLPs of "
                             "other checkpoints: drop one of them")
        if self.router_std == 0 and mode == "random":
            raise UsageError(f"--router-std 0 with a partition (--experts {self.experts} --top-k {self.top_k}): a zero "
                             "router ties every expert, so which slices a token runs is arbitrary; use --router-init "
                             "fit (the default for a partition) or a positive --router-std")
        if mode in ("kmeans", "prompts"):
            raise UsageError(f"--router-init {mode} gives one row per MLP copy, and a partition has one copy cut into "
                             f"{self.experts} different experts: use --router-init fit (the default for a partition, "
                             "fitted to which experts carry each token's activation) or random")

    def _check_sources(self) -> None:
        n, v = len(self.expert_from), self.group_size
        if self.average_shared and not n:
            raise UsageError("--average-shared averages the parent with the --expert-from checkpoints: give at least "
                             "one --expert-from")
        if n and self.experts % (n * v):
            unit = f"{n} source(s) x {v} slices per copy" if v > 1 else f"{n} source(s)"
            raise UsageError(
                f"--experts {self.experts} with {n} --expert-from source(s): every source gives the same number of "
                f"whole copies, so --experts must be a multiple of {n * v} ({unit}); e.g. --experts {n * v}")
        mode = self.router_init_mode[0]
        if mode == "prompts":
            if not n:
                raise UsageError("--router-init prompts:FILE maps --expert-from sources to texts: give --expert-from "
                                 "(or use kmeans:TEXT_FILE)")
            if self.copies != n:
                raise UsageError(f"--router-init prompts gives each source one router row, and --experts "
                                 f"{self.experts} makes {self.copies // n} copies of each; use --experts {n * v}")
            dup = next((s for i, s in enumerate(self.expert_from) if s in self.expert_from[:i]), None)
            if dup is not None:
                raise UsageError(f"--router-init prompts: {dup} is given twice with --expert-from, and its two "
                                 "copies would get the same router row; give each source once")

    @property
    def copies_per_source(self) -> int:
        """Whole copies each --expert-from source gives (0 without sources)."""
        return self.copies // len(self.expert_from) if self.expert_from else 0

    def expert_source(self, expert: int) -> int | None:
        """Which --expert-from source (its position) routed expert `expert` comes from; None: the parent."""
        if not self.expert_from:
            return None
        return expert // self.group_size // self.copies_per_source

    # ------------------------------------------------------------------ parsed options

    @property
    def expert_init_mode(self) -> tuple[str, float]:
        s = self.expert_init.strip()
        if s == "copy":
            return "copy", 0.0
        m = re.fullmatch(r"(drop|noise):([0-9.eE+-]+)", s)
        if not m:
            raise UsageError(f"--expert-init {s!r}: use copy, drop:R (0 < R <= 1) or noise:STD (STD > 0)")
        kind, value = m.group(1), float(m.group(2))
        if kind == "drop" and not 0 < value <= 1:
            raise UsageError(f"--expert-init drop:R needs 0 < R <= 1, got {value}")
        if kind == "noise" and value <= 0:
            raise UsageError(f"--expert-init noise:STD needs STD > 0, got {value}")
        return kind, value

    @property
    def router_init_mode(self) -> tuple[str, Path | None]:
        """("random", None), or ("kmeans", TEXT) where TEXT None is the built-in sample (upcycle.convert.router_init).

        auto: k-means for --routing renorm (exact with any router, and the routers learn; docs/study.md), random
        for softmax and sigmoid (exact only with a zero router, --router-std 0); for a partition, fit (each expert's
        row fitted to the parent's activations, upcycle.convert.partition) whatever the routing rule."""
        s = self.router_init.strip()
        if s == "auto":
            if self.partition:
                return "fit", None
            return ("kmeans", None) if self.routing == "renorm" else ("random", None)
        if s == "random":
            return "random", None
        if s in ("kmeans", "fit"):
            return s, None
        for mode in ("kmeans", "prompts", "fit"):
            if s.startswith(f"{mode}:") and s[len(mode) + 1:].strip():
                return mode, Path(s[len(mode) + 1:].strip()).expanduser()
        raise UsageError(f"--router-init {s!r}: use auto, random, kmeans (a built-in text sample) or kmeans:TEXT "
                         "(or prompts:FILE with --expert-from, fit or fit:TEXT for a partition)")

    @property
    def sample_pass(self) -> bool:
        """Whether convert runs the parent on sample text to group the neurons or fit the router (a partition's
        fitted router or shared neurons, or --slice-order coactivation; upcycle.convert.partition)."""
        return (self.slice_order == "coactivation"
                or self.partition and (self.router_init_mode[0] == "fit" or self.shared_experts > 0))

    @property
    def grouping(self) -> bool:
        """Whether the experts' neurons come from upcycle.convert.partition (clustered, or a partition's shared
        neurons chosen by use) rather than from the slice order alone."""
        return self.slice_order in ("cluster", "coactivation") or self.sample_pass

    @property
    def sample_text(self) -> Path | None:
        """The text the sample pass runs the parent on (None: the built-in sample): fit:TEXT's when given."""
        mode, text = self.router_init_mode
        return text if mode == "fit" else None

    @property
    def router_description(self) -> str:
        """How the router starts, in words (plan, model card)."""
        mode, text = self.router_init_mode
        if mode == "kmeans":
            from upcycle.convert.router_init import describe

            return f"k-means of the parent's hidden states on {describe(text)}"
        if mode == "fit":
            from upcycle.convert.router_init import describe

            return (f"least squares on the parent's hidden states, fitted to which experts carry the most of each "
                    f"token's MLP output on {describe(text)}")
        if mode == "prompts":
            return f"one row per --expert-from source, from the hidden states of its texts in {text}"
        return "zero router (every expert ties)" if self.zero_router else f"random, std {self.router_std:g}"

    @property
    def zero_router(self) -> bool:
        """A router of zeros: every expert ties, softmax gives each exactly 1/E and sigmoid exactly 1/2."""
        return self.router_std == 0 and self.router_init_mode[0] == "random"

    @property
    def exact(self) -> bool:
        """Whether this recipe is function-preserving by construction (before dtype rounding)."""
        return self.inexact_reason is None

    @property
    def inexact_reason(self) -> str | None:
        """Why the start is not the parent's function by construction (None: it is, up to dtype rounding)."""
        if self.partition:
            return (f"a partition: each token runs {self.top_k} of {self.experts} routed slices of one MLP copy "
                    "and loses what the others would add")
        if self.expert_init_mode[0] != "copy":
            return f"expert init {self.expert_init} perturbs experts on purpose"
        if self.routing != "renorm" and not self.zero_router:
            router = {"kmeans": "k-means router", "prompts": "router from the sources' texts"}.get(
                self.router_init_mode[0], f"router std {self.router_std:g}")
            return (f"--routing {self.routing} reproduces the parent only with a zero router (--router-std 0); "
                    f"with a {router} the chosen weights vary per token")
        return None

    def parse_moe_layers(self, num_layers: int) -> list[int]:
        return parse_layers(self.moe_layers, num_layers, option="--moe-layers")
