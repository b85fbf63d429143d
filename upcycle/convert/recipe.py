"""The upcycling recipe: what the user asked for, validated, and the expert layout that follows from it.

Notation (as in docs/background.md, section 2): dense intermediate size I, granularity G (each expert is I/G wide),
S shared experts, E routed experts, top-k K. The MLP's neurons are cut into G slices. Routed experts come in
"virtual groups" of v slices that together rebuild the part of the MLP the shared experts do not hold; the
router rows of a group are tied, so a token always picks whole groups and the sum of what it picks is exactly
the parent's MLP (times the group's scale, undone on down_proj).

The routing rule (`--routing`, see upcycle.families.moe.ROUTINGS) decides what weight each chosen expert gets at
the start, and so the factor that makes the start reproduce the parent (`routed_scale`): renormalised weights
are exact with any router; softmax and sigmoid weights without renormalisation are exact only with a zero
router (every expert then gets exactly 1/E, or sigmoid(0) = 1/2), which is what gives the router a gradient
from the language-modelling loss at step 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from upcycle.core.errors import UsageError
from upcycle.core.layers import parse_layers
from upcycle.core.tensors import FLOAT_DTYPES
from upcycle.families.moe import ROUTINGS, format_names

FORMATS = format_names()
DTYPES = ("auto", *FLOAT_DTYPES)


@dataclass(frozen=True)
class Recipe:
    experts: int = 8
    top_k: int = 2
    granularity: int = 1
    shared_experts: int = 0
    format: str = "auto"
    moe_layers: str = "all"
    router_init: str = "auto"
    router_std: float = 0.02
    routing: str = "renorm"
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
        for name in ("experts", "top_k", "granularity"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.shared_experts < 0:
            raise UsageError("--shared-experts must be 0 or more")
        if self.top_k > self.experts:
            raise UsageError(f"--top-k {self.top_k} is larger than --experts {self.experts}")
        if self.format not in FORMATS:
            raise UsageError(f"unknown --format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.dtype not in DTYPES:
            raise UsageError(f"unknown --dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.slice_order not in ("contiguous", "random"):
            raise UsageError(f"unknown --slice-order {self.slice_order!r}; choose contiguous or random")
        if self.routing not in ROUTINGS:
            raise UsageError(f"unknown --routing {self.routing!r}; choose one of {', '.join(ROUTINGS)}")
        if not self.router_std >= 0:
            raise UsageError("--router-std must be 0 (a zero router) or positive")
        self.expert_init_mode  # noqa: B018 - parse now so errors come before any work
        self.router_init_mode  # noqa: B018
        if self.router_std == 0 and self.routing == "renorm":
            raise UsageError("--router-std 0 with --routing renorm: identical experts then give the zero router no "
                             "gradient, so it never leaves zero; use --routing softmax or sigmoid, or a positive --router-std")
        if self.router_std == 0 and self.router_init_mode[0] != "random" and self.router_init != "auto":
            mode = self.router_init_mode[0]
            raise UsageError(f"--router-std 0 asks for a zero router, --router-init {mode} sets it from "
                             f"{'centroids' if mode == 'kmeans' else 'the texts of each source'}; drop one of them")
        v = self.group_size
        if self.shared_experts >= self.granularity and self.shared_experts % self.granularity:
            raise UsageError(
                f"--shared-experts {self.shared_experts} with --granularity {self.granularity}: shared experts must be "
                f"fewer than G (they take whole slices) or a multiple of G (they take whole copies) for an exact init"
            )
        if self.experts % v or self.top_k % v:
            why = f"granularity {self.granularity}" + (f" minus {self.shared_experts} shared" if 0 < self.shared_experts < self.granularity else "")
            raise UsageError(
                f"--experts {self.experts} and --top-k {self.top_k} must be multiples of the virtual-group size {v} ({why}): "
                f"a token must pick whole groups of slices for the MoE to stay exact; "
                f"e.g. --experts {max(v, self.experts // v * v)} --top-k {max(v, self.top_k // v * v)}"
            )
        self._check_sources()

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
        for softmax and sigmoid (exact only with a zero router, --router-std 0)."""
        s = self.router_init.strip()
        if s == "auto":
            return ("kmeans", None) if self.routing == "renorm" else ("random", None)
        if s == "random":
            return "random", None
        if s == "kmeans":
            return "kmeans", None
        for mode in ("kmeans", "prompts"):
            if s.startswith(f"{mode}:") and s[len(mode) + 1:].strip():
                return mode, Path(s[len(mode) + 1:].strip()).expanduser()
        raise UsageError(f"--router-init {s!r}: use auto, random, kmeans (a built-in text sample) or kmeans:TEXT "
                         "(or prompts:FILE with --expert-from)")

    @property
    def router_description(self) -> str:
        """How the router starts, in words (plan, model card)."""
        mode, text = self.router_init_mode
        if mode == "kmeans":
            from upcycle.convert.router_init import describe

            return f"k-means of the parent's hidden states on {describe(text)}"
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
        if self.expert_init_mode[0] != "copy":
            return f"expert init {self.expert_init} perturbs experts on purpose"
        if self.routing != "renorm" and not self.zero_router:
            router = {"kmeans": "k-means router", "prompts": "router from the sources' texts"}.get(
                self.router_init_mode[0], f"router std {self.router_std:g}")
            return (f"--routing {self.routing} reproduces the parent only with a zero router (--router-std 0); "
                    f"with a {router} the chosen weights vary per token")
        return None

    # ------------------------------------------------------------------ layout

    @property
    def group_size(self) -> int:
        """v: routed slices that together rebuild the routed share of one MLP copy."""
        g, s = self.granularity, self.shared_experts
        return g - s if 0 < s < g else g

    @property
    def copies(self) -> int:
        return self.experts // self.group_size

    @property
    def groups_per_token(self) -> int:
        return self.top_k // self.group_size

    @property
    def shared_full_copies(self) -> int:
        """c: whole MLP copies held by the shared experts when S is a multiple of G (0 otherwise)."""
        g, s = self.granularity, self.shared_experts
        return s // g if s >= g else 0

    @property
    def routed_down_scale(self) -> float:
        """Factor on routed down_proj: the selected weights sum to 1 over v slices of each picked group."""
        c = self.shared_full_copies
        return self.group_size / (c + 1) if c else float(self.group_size)

    @property
    def routed_scale(self) -> float:
        """Factor on each routed expert's output that makes the start reproduce the parent under the routing rule.

        A token picks k/v whole groups; each chosen expert gets the weight w0 of a tied router (renorm: 1/k,
        softmax with a zero router: 1/E, sigmoid: 1/2), so the routed part is (k/v) * w0 * scale * (routed MLP
        share); that must equal the routed share 1/(c+1): scale = routed_down_scale / (k * w0).
        """
        if self.routing == "renorm":
            return self.routed_down_scale
        per_expert = {"softmax": Fraction(1, self.experts), "sigmoid": Fraction(1, 2)}[self.routing]
        c = self.shared_full_copies
        return float(Fraction(self.group_size, c + 1) / (self.top_k * per_expert))

    @property
    def shared_down_scale(self) -> float:
        c = self.shared_full_copies
        return 1.0 / (c + 1) if c else 1.0

    def parse_moe_layers(self, num_layers: int) -> list[int]:
        return parse_layers(self.moe_layers, num_layers, option="--moe-layers")
