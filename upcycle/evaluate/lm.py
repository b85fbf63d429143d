"""Scoring a causal LM on held-out blocks: per-block loss and accuracy, throughput, peak memory.

Every block is an independent sequence of seq_len tokens; position t predicts token t+1, so each block
contributes seq_len - 1 scored tokens. Per-block numbers are kept so that the interval (stats.mean_ci) and
the paired comparison with the parent are over blocks.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

from upcycle.core.events import SILENT, Events
from upcycle.evaluate.stats import Estimate, clustered_mean_ci, mean_ci, perplexity


@dataclass
class Scores:
    block_loss: list[float]  # mean next-token NLL (nats) of each block
    block_accuracy: list[float]  # share of next tokens predicted exactly (argmax)
    tokens_scored: int
    seconds: float  # forward passes only
    input_tokens: int
    peak_bytes: int | None
    memory_method: str
    documents: list[str] | None = None  # each block's document: the loss interval is then over documents

    @property
    def loss(self) -> Estimate:
        return clustered_mean_ci(self.block_loss, self.documents) if self.documents else mean_ci(self.block_loss)

    @property
    def perplexity(self) -> Estimate:
        return perplexity(self.loss)

    @property
    def accuracy(self) -> float:
        return sum(self.block_accuracy) / len(self.block_accuracy)

    @property
    def tokens_per_second(self) -> float:
        return self.input_tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_json(self) -> dict:
        loss, ppl = self.loss, self.perplexity
        return {
            "loss": loss.mean, "loss_ci95": None if loss.low is None else [loss.low, loss.high],
            "perplexity": ppl.mean, "perplexity_ci95": None if ppl.low is None else [ppl.low, ppl.high],
            "accuracy": self.accuracy, "blocks": len(self.block_loss), "tokens_scored": self.tokens_scored,
            "tokens_per_second": self.tokens_per_second, "seconds": self.seconds,
            "peak_memory_bytes": self.peak_bytes, "memory_method": self.memory_method,
            "block_loss": self.block_loss, "block_document": self.documents,
        }


def weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())


class PeakMemory:
    """Peak memory of a model while it runs: weights plus the largest activation footprint seen.

    On CUDA, the allocator's own peak. On CPU there is no allocator counter, so a thread samples the process's
    resident set every 5 ms: peak = weights + (highest RSS during the run - RSS before it). Sampling can miss a
    spike shorter than 5 ms, so this is a close lower bound.
    """

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.peak: int | None = None
        self.method = "unavailable"

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda max_memory_allocated"
            return self
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        if _rss(self._page) is None:
            return self
        self.method = "weights + sampled RSS growth (CPU)"
        self._base = _rss(self._page)
        self._max = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            r = _rss(self._page)
            if r is not None and r > self._max:
                self._max = r

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        elif self.method != "unavailable":
            self._stop.set()
            self._thread.join()
            r = _rss(self._page)
            self._max = max(self._max, r or 0)
            self.peak = weights_bytes(self.model) + max(0, self._max - self._base)
        return False


def _rss(page: int) -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    except (OSError, ValueError, IndexError):
        return None


def score(model, blocks, *, batch_size: int = 4, on_batch: Callable | None = None, events: Events = SILENT,
          description: str = "scoring") -> Scores:
    """Score `blocks` ([n, seq_len] token ids) with `model`. on_batch(start, input_ids) runs after each forward
    (routing recorders read their hooks there); progress goes to `events` as a task named `description`."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    n, L = blocks.shape
    if L < 2:
        raise ValueError("blocks need at least 2 tokens")
    losses: list[float] = []
    accs: list[float] = []
    seconds = 0.0
    with events.task(description, n) as task, PeakMemory(model, device) as mem, torch.inference_mode():
        for start in range(0, n, batch_size):
            ids = blocks[start:start + batch_size].to(device)
            t0 = time.perf_counter()
            logits = model(input_ids=ids, use_cache=False).logits
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - t0
            # one block at a time: a [L, vocab] slice is a view, so no batch-sized copy of the logits is made
            # (with a 50k vocabulary that copy would dominate the peak memory being measured)
            for b in range(ids.shape[0]):
                pred, target = logits[b, :-1].float(), ids[b, 1:]
                losses.append(float(F.cross_entropy(pred, target)))
                accs.append(float((pred.argmax(-1) == target).float().mean()))
            del logits, pred
            if on_batch is not None:
                on_batch(start, ids)
            task.advance(ids.shape[0])
    if not all(map(_finite, losses)):
        from upcycle.core.errors import InputError

        raise InputError(f"{description}: the model produced a non-finite loss (broken weights or dtype overflow; "
                         "try --dtype float32)")
    return Scores(losses, accs, n * (L - 1), seconds, n * L, mem.peak, mem.method)


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")
