"""Have the routers learned? Measured against where they started, not against absolute levels.

A k-means router starts decisive (entropy about 0.85 of log E on SmolLM2), so an absolute entropy threshold calls
it "learned" before it has taken a step. What training did to the routing is measured instead against the
converted checkpoint the MoE run started from (run.json's start, confirmed by upcycle.json's weights digest),
scored on the same held-out blocks:

- topk_changed: the share of (held-out token, MoE layer) pairs whose set of chosen experts differs from the start's;
- entropy change: the mean router entropy (fraction of log E) now minus at the start;
- expert drift: 1 - cosine of each expert to its start, where that start is known exactly (copies of the parent's
  MLP with --parent given: the drift reference is then the start itself);
- lm_share: the language-modelling loss's share of the router gradient over the last quarter of the logged steps
  (metrics.jsonl's router_grad_lm_share), i.e. whether the routing follows the LM loss or only the auxiliary losses.

"Learned" needs both: at least TOPK_CHANGED_MIN of the choices changed, and at least LM_SHARE_MIN of the router's
gradient from the LM loss. The entropy change and the drift are reported beside them with their own thresholds, as
context: a router can learn without its entropy moving, and experts can move without the routing changing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

TOPK_CHANGED_MIN = 0.05  # share of (token, layer) expert choices that differ from the start
LM_SHARE_MIN = 0.5  # LM part / (LM + router-loss parts) of the router gradient, late in training
ENTROPY_MOVED = 0.01  # |entropy change| in fractions of log E that counts as moved
EXPERTS_MOVED = 1e-6  # mean 1 - cos of the experts to their start that counts as moved


@dataclass
class RoutingChange:
    """What training changed in the routing, measured on the held-out blocks against the run's start."""

    start: str | None  # the converted checkpoint the measures are against; None: not available
    why_not: str | None = None  # why the start could not be used
    entropy_start: float | None = None  # mean router entropy / log E over MoE layers, at the start
    entropy_end: float | None = None
    topk_changed: float | None = None  # over all layers
    topk_changed_by_layer: dict[int, float] = field(default_factory=dict)
    expert_drift: float | None = None  # mean 1 - cos of the experts to their start; None: start not known exactly
    lm_share: float | None = None
    lm_share_steps: int = 0  # logged steps the share is the mean of
    router_trained: bool | None = None

    @property
    def entropy_change(self) -> float | None:
        if self.entropy_start is None or self.entropy_end is None:
            return None
        return self.entropy_end - self.entropy_start

    def to_json(self) -> dict:
        return {"start": self.start, "why_not": self.why_not, "entropy_start": self.entropy_start,
                "entropy_end": self.entropy_end, "entropy_change": self.entropy_change,
                "topk_changed": self.topk_changed,
                "topk_changed_by_layer": {str(k): v for k, v in self.topk_changed_by_layer.items()} or None,
                "expert_drift_from_start": self.expert_drift, "lm_share": self.lm_share,
                "lm_share_steps": self.lm_share_steps, "router_trained": self.router_trained,
                "thresholds": {"topk_changed": TOPK_CHANGED_MIN, "lm_share": LM_SHARE_MIN,
                               "entropy_moved": ENTROPY_MOVED, "experts_moved": EXPERTS_MOVED}}


def mean_entropy(routing) -> float | None:
    vals = [r.entropy_norm for r in routing if r.entropy_norm is not None]
    return sum(vals) / len(vals) if vals else None


def topk_changed(start: dict[int, list], end: dict[int, list]) -> dict[int, float]:
    """{layer: share of tokens whose sorted top-k differs} from two RoutingCollector(keep_choices=True).choices."""
    import torch

    out = {}
    for layer, chunks in end.items():
        if layer not in start or not chunks:
            continue
        a, b = torch.cat(start[layer]), torch.cat(chunks)
        if a.shape != b.shape:
            raise ValueError(f"layer {layer}: {tuple(a.shape)} vs {tuple(b.shape)} routed tokens")
        out[layer] = float((a != b).any(dim=-1).double().mean())
    return out


def lm_share(rows: list[dict]) -> tuple[float | None, int]:
    """Mean router_grad_lm_share over the last quarter of the steps that logged it (at least one)."""
    shares = [r["router_grad_lm_share"] for r in rows if isinstance(r.get("router_grad_lm_share"), (int, float))]
    if not shares:
        return None, 0
    tail = shares[-max(1, len(shares) // 4):]
    return sum(tail) / len(tail), len(tail)


def router_trained(record: dict | None) -> bool | None:
    """Whether the run trained the routers (run.json: trainable parameters, LoRA groups)."""
    if record is None:
        return None
    if (record.get("trainable") or {}).get("router"):
        return True
    return "router" in (record["config"].get("lora") or [])


def start_checkpoint(record: dict | None, manifest) -> tuple[Path | None, str | None]:
    """(the converted checkpoint the MoE run started from, None) or (None, why it cannot be used)."""
    if manifest is None or not manifest.weights_digest:
        return None, "upcycle.json records no weights digest, so the converted checkpoint cannot be identified"
    if record is None:
        return None, "no training run (run.json) names the checkpoint it started from: pass --run"
    start = (record.get("start") or {}).get("model") or record["config"].get("model")
    if not start or not Path(start).is_dir():
        return None, f"the run's start {start} is no longer there"
    from upcycle.storage.manifest import folder_digest

    if folder_digest(start) != manifest.weights_digest:
        return None, (f"the run started from {start}, which is not the conversion upcycle.json records (a run "
                      "continued from a trained MoE, or the folder changed)")
    return Path(start), None


def judge(change: RoutingChange) -> tuple[bool | None, str]:
    """(learned, the sentence with every number and threshold)."""
    facts = []
    if change.topk_changed is not None:
        facts.append(f"{change.topk_changed:.1%} of the held-out tokens' expert choices changed since the start "
                     f"({'at or above' if change.topk_changed >= TOPK_CHANGED_MIN else 'below'} "
                     f"{TOPK_CHANGED_MIN:.0%})")
    if change.entropy_change is not None:
        moved = abs(change.entropy_change) >= ENTROPY_MOVED
        facts.append(f"router entropy {change.entropy_start:.3f} -> {change.entropy_end:.3f} of log E "
                     f"({change.entropy_change:+.3f}, {'moved' if moved else 'not moved'} at {ENTROPY_MOVED})")
    if change.lm_share is not None:
        facts.append(f"the LM loss gave {change.lm_share:.0%} of the router gradient over the last "
                     f"{change.lm_share_steps} logged steps ({'at or above' if change.lm_share >= LM_SHARE_MIN else 'below'} "
                     f"{LM_SHARE_MIN:.0%})")
    if change.expert_drift is not None:
        facts.append(f"experts' mean 1 - cos to their start {change.expert_drift:.2e} "
                     f"({'moved' if change.expert_drift >= EXPERTS_MOVED else 'not moved'} at {EXPERTS_MOVED:g})")
    numbers = "; ".join(facts)
    if change.start is None:
        return None, f"Whether the routers learned cannot be measured: {change.why_not}."
    if change.router_trained is False:
        return False, f"The routers did not train in this run (--train): {numbers}."
    if change.lm_share is None:
        return None, (f"Whether the routers learned cannot be told: the training log has no router gradient split "
                      f"(router_grad_lm_share); {numbers}.")
    if change.topk_changed >= TOPK_CHANGED_MIN and change.lm_share >= LM_SHARE_MIN:
        return True, f"The routers have learned to route, measured against the start {change.start}: {numbers}."
    why = []
    if change.topk_changed < TOPK_CHANGED_MIN:
        why.append("the routing has hardly changed since the start")
    if change.lm_share < LM_SHARE_MIN:
        why.append("the router gradient comes mostly from the auxiliary losses, not the LM loss")
    return False, (f"Not learned yet: {' and '.join(why)} (measured against the start {change.start}): {numbers}.")
