"""Small statistics on per-block numbers: means with Student-t confidence intervals, paired differences.

Held-out text is scored in fixed-length blocks. Blocks, not tokens, are the unit of the interval: tokens inside
a block are strongly correlated, so a per-token interval would be far too narrow. Both models see the same
blocks, so their difference is a *paired* comparison, whose interval is much tighter than the two separate ones.

Blocks of the same document are correlated too (64 blocks of 256 tokens are three to five source files), so
when each block's document is known the interval is over documents: the mean is still the mean over blocks, its
standard error the cluster-robust one (blocks grouped by document, the usual G/(G-1) correction) and the t
quantile has G - 1 degrees of freedom for G documents. With one block per document it is the block interval.
Below MIN_DOCUMENTS documents no interval is trusted and no verdict is given: a cluster-robust variance from
fewer clusters is itself too uncertain, even with the t(G - 1) quantile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

# Two-sided 95% quantiles of Student's t (t_{0.975, df}); scipy is not a dependency and a table is exact enough.
_T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
    11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
    21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042,
    40: 2.021, 60: 2.000, 120: 1.980,
}


def t975(df: int) -> float:
    """t_{0.975} for `df` degrees of freedom; between table rows, linear in 1/df (the usual interpolation)."""
    if df < 1:
        raise ValueError("need at least one degree of freedom")
    if df in _T975:
        return _T975[df]
    if df > 120:
        lo_df, lo_t, hi_inv, hi_t = 120, _T975[120], 0.0, 1.960
    else:
        lo_df = max(k for k in _T975 if k < df)
        hi_df = min(k for k in _T975 if k > df)
        lo_t, hi_t, hi_inv = _T975[lo_df], _T975[hi_df], 1 / hi_df
    w = (1 / lo_df - 1 / df) / (1 / lo_df - hi_inv)
    return lo_t + w * (hi_t - lo_t)


@dataclass(frozen=True)
class Estimate:
    """A mean over n blocks with its 95% interval (None when n < 2: one block gives no spread)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    std: float | None  # sample standard deviation of the block values
    documents: int | None = None  # documents behind the blocks when the interval is over documents

    @property
    def half_width(self) -> float | None:
        return None if self.low is None else (self.high - self.low) / 2

    def to_json(self) -> dict:
        return {"mean": self.mean, "ci95": None if self.low is None else [self.low, self.high], "n": self.n,
                "std": self.std, "documents": self.documents}


def mean_ci(values: Sequence[float]) -> Estimate:
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        raise ValueError("no values")
    mean = math.fsum(vals) / n
    if n < 2:
        return Estimate(mean, None, None, n, None)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t975(n - 1) * std / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half, n, std)


MIN_DOCUMENTS = 10


def clustered_mean_ci(values: Sequence[float], clusters: Sequence) -> Estimate:
    """The mean of `values` with a 95% interval over clusters (each value's document): cluster-robust standard
    error, Student-t with G - 1 degrees of freedom. One cluster gives no interval."""
    vals = [float(v) for v in values]
    if len(vals) != len(clusters):
        raise ValueError("one cluster per value")
    base = mean_ci(vals)
    sums: dict = {}
    for v, c in zip(vals, clusters):
        sums[c] = sums.get(c, 0.0) + (v - base.mean)
    g = len(sums)
    if g < 2:
        return Estimate(base.mean, None, None, base.n, base.std, g)
    n = len(vals)
    se = math.sqrt(g / (g - 1) * math.fsum(x * x for x in sums.values())) / n
    half = t975(g - 1) * se
    return Estimate(base.mean, base.mean - half, base.mean + half, n, base.std, g)


def perplexity(loss: Estimate) -> Estimate:
    """exp of the loss and of its interval ends: the interval of the geometric-mean perplexity over blocks."""
    def e(x):
        return None if x is None else _exp(x)

    return Estimate(_exp(loss.mean), e(loss.low), e(loss.high), loss.n, None, loss.documents)


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


@dataclass(frozen=True)
class Comparison:
    """Model minus parent, block by block on identical tokens."""

    diff: Estimate  # mean per-block loss difference, nats (negative: the model is better); over documents if known
    max_abs_diff: float  # largest per-block |difference|: ~1e-6 for an exact fresh conversion in fp32
    tolerance: float  # below this everywhere the two are the same model numerically
    verdict: str  # "same", "better", "worse", "no significant difference" or "too few documents"
    block_diff: Estimate | None = None  # the interval over blocks, as if they were independent (for comparison)
    min_documents: int = MIN_DOCUMENTS

    @property
    def perplexity_ratio(self) -> float:
        return _exp(self.diff.mean)

    def to_json(self) -> dict:
        return {"loss_diff": self.diff.to_json(), "perplexity_ratio": self.perplexity_ratio,
                "max_abs_block_diff": self.max_abs_diff, "tolerance": self.tolerance, "verdict": self.verdict,
                "interval_over": "documents" if self.diff.documents is not None else "blocks",
                "documents": self.diff.documents, "min_documents": self.min_documents,
                "loss_diff_over_blocks": None if self.block_diff is None else self.block_diff.to_json()}


def paired_comparison(model: Sequence[float], parent: Sequence[float], tolerance: float,
                      documents: Sequence | None = None, min_documents: int = MIN_DOCUMENTS) -> Comparison:
    """documents: each block's document; then the interval is over documents, and below min_documents of them
    the verdict is "too few documents" (unless the two are the same model)."""
    if len(model) != len(parent):
        raise ValueError("paired comparison needs the same blocks for both models")
    diffs = [float(a) - float(b) for a, b in zip(model, parent)]
    blocks = mean_ci(diffs)
    est = clustered_mean_ci(diffs, documents) if documents is not None else blocks
    max_abs = max(abs(d) for d in diffs)
    if max_abs <= tolerance:
        verdict = "same"
    elif est.documents is not None and est.documents < min_documents:
        verdict = "too few documents"
    elif est.high is not None and est.high < 0:
        verdict = "better"
    elif est.low is not None and est.low > 0:
        verdict = "worse"
    else:
        verdict = "no significant difference"
    return Comparison(est, max_abs, tolerance, verdict, blocks if documents is not None else None, min_documents)
