"""The MoE the user asks for, as the output types see it: how many experts, how many a token takes, how finely
the MLP is cut, how many experts are shared, and the routing-weight rule.

Notation (docs/background.md, section 2): dense intermediate size I, granularity G (each expert is I/G wide),
S shared experts, E routed experts, top-k K. The MLP's neurons are cut into G slices. Routed experts come in
"virtual groups" of v slices that together rebuild the part of the MLP the shared experts do not hold; the
router rows of a group are tied, so a token always picks whole groups and the sum of what it picks is exactly
the parent's MLP (times the group's scale, undone on down_proj).

A partition (`partition`) is the other way to build an MoE from one MLP: one copy cut into E = v experts of which a
token takes k < E (LLaMA-MoE, MoEfication). It runs k/G of the MLP per token instead of at least the whole MLP, and
is not the parent's function by design: what the experts it skips would have added is lost until training.

The routing rule (`ROUTINGS`) decides what weight each chosen expert gets at the start, and so the factor that
makes the start reproduce the parent (`routed_scale`): renormalised weights are exact with any router; softmax and
sigmoid weights without renormalisation are exact only with a zero router (every expert then gets exactly 1/E,
or sigmoid(0) = 1/2), which is what gives the router a gradient from the language-modelling loss at step 0.

How the experts and the router are initialised (copies, Drop-Upcycling, k-means, ...) is convert's business
(upcycle.convert.recipe.Recipe extends this shape with it); the types only need `zero_router` from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from upcycle.core.errors import UsageError

# Routing-weight rules, i.e. how the k chosen experts' weights follow from the router logits. What each rule
# gives one chosen expert when all router logits are equal (a zero router, or a tied virtual group) decides the
# factor that makes the upcycled start reproduce the parent; see MoEShape.routed_scale below and docs/convert.md.
ROUTINGS: dict[str, str] = {
    "renorm": "top-k of the softmax, the k weights renormalised to sum to 1",
    "softmax": "softmax over all experts, top-k, weights not renormalised",
    "sigmoid": "a sigmoid score per expert, top-k, weights not renormalised",
}


@dataclass(frozen=True)
class MoEShape:
    experts: int = 8
    top_k: int = 2
    granularity: int = 1
    shared_experts: int = 0
    routing: str = "renorm"

    def __post_init__(self):
        self._check_counts()
        self._check_routing()
        self._check_groups()

    def _check_counts(self) -> None:
        for name in ("experts", "top_k", "granularity"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.shared_experts < 0:
            raise UsageError("--shared-experts must be 0 or more")
        if self.top_k > self.experts:
            raise UsageError(f"--top-k {self.top_k} is larger than --experts {self.experts}")

    def _check_routing(self) -> None:
        if self.routing not in ROUTINGS:
            raise UsageError(f"unknown --routing {self.routing!r}; choose one of {', '.join(ROUTINGS)}")

    def _check_groups(self) -> None:
        v = self.group_size
        if self.shared_experts >= self.granularity and self.shared_experts % self.granularity:
            raise UsageError(
                f"--shared-experts {self.shared_experts} with --granularity {self.granularity}: shared experts must be "
                f"fewer than G (they take whole slices) or a multiple of G (they take whole copies) for an exact init"
            )
        if self.partition:
            if self.shared_experts >= self.granularity:
                raise UsageError(
                    f"--experts {self.experts} --top-k {self.top_k} cuts one MLP copy into {v} experts (a partition), "
                    f"whose shared experts are slices of that copy: --shared-experts must be below --granularity "
                    f"{self.granularity}")
            return
        if self.experts % v or self.top_k % v:
            why = f"granularity {self.granularity}" + (f" minus {self.shared_experts} shared" if 0 < self.shared_experts < self.granularity else "")
            raise UsageError(
                f"--experts {self.experts} and --top-k {self.top_k} must be multiples of the virtual-group size {v} ({why}): "
                f"a token must pick whole groups of slices for the MoE to stay exact; "
                f"e.g. --experts {max(v, self.experts // v * v)} --top-k {max(v, self.top_k // v * v)}; "
                f"or, for an MoE cheaper than its parent that is not exact by design, a partition of one MLP copy: "
                f"--experts {v} with --top-k below {v} (see --slice-order cluster or coactivation)"
            )

    @property
    def zero_router(self) -> bool:
        """A router of zeros (every expert ties); the shape alone does not start one (a Recipe may)."""
        return False

    # ------------------------------------------------------------------ layout

    @property
    def group_size(self) -> int:
        """v: routed slices that together rebuild the routed share of one MLP copy."""
        g, s = self.granularity, self.shared_experts
        return g - s if 0 < s < g else g

    @property
    def partition(self) -> bool:
        """One MLP copy cut into E = v experts of which a token takes fewer than all: cheaper than the parent, and
        not its function (the skipped experts' share is missing at the start)."""
        return self.experts == self.group_size and self.top_k < self.experts

    @property
    def copies(self) -> int:
        return self.experts // self.group_size

    @property
    def groups_per_token(self) -> int:
        """Whole virtual groups a token picks (a partition's token takes part of its one group: 1)."""
        return 1 if self.partition else self.top_k // self.group_size

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
        if self.partition:
            # a partition cannot add up to the parent; the closest start counts every chosen slice once, as the
            # parent's sum does: the chosen expert's weight when the k chosen tie (w0) times 1/w0
            return float(1 / self._tied_weight)
        if self.routing == "renorm":
            return self.routed_down_scale
        per_expert = self._tied_weight
        c = self.shared_full_copies
        return float(Fraction(self.group_size, c + 1) / (self.top_k * per_expert))

    @property
    def _tied_weight(self) -> Fraction:
        """w0: one chosen expert's routing weight when the router's logits tie (renorm over the k chosen: 1/k; softmax
        over all E: 1/E; sigmoid of 0: 1/2)."""
        return {"renorm": Fraction(1, self.top_k), "softmax": Fraction(1, self.experts),
                "sigmoid": Fraction(1, 2)}[self.routing]

    @property
    def shared_down_scale(self) -> float:
        c = self.shared_full_copies
        return 1.0 / (c + 1) if c else 1.0
