"""Data-driven router initialisation: k-means centroids of the parent's hidden states, per MoE layer.

As in MoEfication and LLaMA-MoE, the router starts from structure in the parent's own activations instead of
noise: the tokens of a real text are run through the parent (one decoder layer at a time, so memory stays at
about one layer), the inputs of each MoE layer's MLP are collected, and spherical k-means (cosine, k = number
of expert copies) gives one direction per copy. A copy's router row is its centroid, scaled so that the router
logits over the sample have unit standard deviation (a softmax neither flat nor saturated), and the mean row is
subtracted from every row (see CENTRED). Rows are then tied within virtual groups as for a random router.

With renormalised top-k weights this keeps the conversion exact (only *which* identical copy a token picks
depends on the centroids), and it is what makes the router learn: different tokens reach different copies from
the first step, so the copies drift apart, and once they differ the language-modelling loss has a gradient for
the router (with identical copies and renormalised weights it has none). That is why it is the default for
--routing renorm; docs/study.md has the measurements.

Without a text of the user's, the sample is taken from this Python's standard library sources (the training
side of upcycle's own split), which exist on every machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from upcycle.core.events import SILENT, Events
from upcycle.core.errors import InputError
# the built-in sample lives in core so that eval ranks neurons on the same text; re-exported for convert's modules
from upcycle.core.sample import BLOCK, DEFAULT_FILES, MAX_TOKENS, default_files, default_texts, \
    describe_default  # noqa: F401

ITERATIONS = 25
# The centroids share a large common part (the mean direction of the hidden states), so every token's logits share a
# large offset: the softmax ignores it, the router z-loss does not (logsumexp^2 ~ 44 on SmolLM2 against ~4.3 for a
# near-uniform router), and its gradient pushes every MoE layer's input against that direction. Subtracting the
# mean row removes the offset from every token's logits and leaves every softmax, and so every routing, unchanged.
CENTRED = True


def sample_identity(text: Path | None, joined: str, tokens: int) -> dict:
    """What upcycle.json records of the k-means sample: where it came from, a hash of the text the parent read and
    how many of its tokens were clustered, so that two conversions can be told apart by their samples."""
    import hashlib
    import platform

    if text is None:
        files = [f.name for f in default_files()]
        where = {"source": "built-in: the Python standard library", "python": platform.python_version(),
                 "files": files}
    else:
        where = {"source": str(text)}
    return {**where, "text_sha256": hashlib.sha256(joined.encode("utf-8", "surrogatepass")).hexdigest(),
            "tokens": tokens}


def describe(text: Path | None) -> str:
    return str(text) if text is not None else describe_default()


def _texts(path: Path | None) -> list[str]:
    if path is None:
        return default_texts()
    from upcycle.core.data import iter_texts, resolve_data_files

    files = resolve_data_files([str(path)])
    return list(_take_chars(iter_texts(files), 4 * MAX_TOKENS * 8))


def _take_chars(texts, limit: int):
    total = 0
    for t in texts:
        if total >= limit:
            break
        yield t[: limit - total]
        total += len(t)


def spherical_kmeans(x, k: int, seed: int, iterations: int = ITERATIONS):
    """Unit-norm centroids (k, H) of the unit-normalised rows of x (N, H), k-means++ seeding."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    n = x.shape[0]
    centroids = [x[torch.randint(n, (1,), generator=g)].squeeze(0)]
    sim = x @ centroids[0]  # each point's similarity to its nearest centroid so far (a running max)
    for _ in range(1, k):
        dist = (1 - sim).clamp_min(1e-12)
        centroids.append(x[torch.multinomial(dist, 1, generator=g)].squeeze(0))
        sim = torch.maximum(sim, x @ centroids[-1])
    c = torch.stack(centroids)
    for _ in range(iterations):
        assign = (x @ c.T).argmax(dim=1)
        # the sum of each cluster's points as one (k, N) x (N, H) product: index_add_ into k rows runs nearly
        # serially on CPU (about 9x slower at 2,048 x 2,048 here)
        new = torch.nn.functional.one_hot(assign, k).T.to(x.dtype) @ x
        empty = new.norm(dim=1) == 0
        new[empty] = c[empty]  # keep a centroid that lost all its points rather than dropping an expert
        c = torch.nn.functional.normalize(new, dim=-1)
    return c


def kmeans_job(ckpt, text: Path | None, plan, events: Events = SILENT,
               stop: Callable[[], bool] | None = None) -> Callable[[], dict[int, np.ndarray] | None]:
    """Read and tokenise the sample now (a bad --router-init fails here, before anything is written) and return the
    parent pass that computes {layer: (copies, H) float32 router rows} from the parent's activations on `text`
    (None: the default sample); the pass returns None when stop() ended it early."""

    from upcycle.convert.parent_pass import encode

    events.info(f"router init: k-means of the parent's hidden states on {describe(text)}")
    texts = [t for t in _texts(text) if t.strip()]
    if not texts:
        raise InputError(f"--router-init kmeans: {text} holds no text")
    joined = "\n\n".join(texts)
    ids = encode(ckpt.load_spec, joined)[:MAX_TOKENS]
    if ids.size < 4 * plan.recipe.copies:
        raise InputError(f"--router-init kmeans: {describe(text)} gives {ids.size} tokens, too few for "
                         f"{plan.recipe.copies} clusters")
    block = min(BLOCK, ids.size)
    ids = ids[: ids.size // block * block].reshape(-1, block)
    moe_layers = set(plan.moe_layers)

    def run() -> dict[int, np.ndarray] | None:
        from upcycle.convert.parent_pass import stream_parent

        bases: dict[int, np.ndarray] = {}

        def on_mlp(i: int, x, y) -> None:
            if i not in moe_layers:
                return
            c = spherical_kmeans(x, plan.recipe.copies, seed=plan.recipe.seed * 1000 + i)
            logits = x.float() @ c.T
            scale = 1.0 / float(logits.std().clamp_min(1e-6))
            if CENTRED:
                c = c - c.mean(0, keepdim=True)
            bases[i] = (c * scale).numpy().astype(np.float32)

        # float32 (bf16 for a bf16 parent where the CPU multiplies bf16 natively) and torch's fused attention are
        # plenty for choosing directions, and several times faster than the float64 eager attention of verification
        done = stream_parent(ckpt, ids, None, on_mlp, dtype=pass_dtype(ckpt), attention="sdpa", stop=stop)
        return None if done is None else bases

    run.sample = sample_identity(text, joined, int(ids.size))  # upcycle.json's router_init_sample
    return run


class BackgroundBases:
    """Router rows that a job computes on another thread (the k-means pass beside the writer).

    Passed to the plan as its router_bases: the writer writes the router tensors last (upcycle.convert.writer's
    `defer`), and the first `get` waits for the job and raises what it raised. `seconds`: the job's own wall time."""

    def __init__(self, future, stop_flag: list[bool]):
        import time

        self._future, self._stop = future, stop_flag
        start = time.perf_counter()
        self.seconds: float | None = None
        future.add_done_callback(lambda _: setattr(self, "seconds", time.perf_counter() - start))

    def result(self) -> dict[int, np.ndarray]:
        bases = self._future.result()
        if bases is None:  # stopped: only close() asks for that, so nothing should read the rows afterwards
            raise AssertionError("the router init was stopped before it finished")
        return bases

    def get(self, layer: int, default=None):
        return self.result().get(layer, default)

    def __bool__(self) -> bool:
        return True

    def close(self) -> None:
        """Stop the job at its next layer (when the rows are no longer wanted) and wait for it."""
        if not self._future.done():
            self._stop[0] = True
        try:
            self._future.result()
        except BaseException:  # reported by result() to whoever still wants the rows; nobody does after close
            pass


def pass_dtype(ckpt):
    """The k-means pass's compute dtype: the parent's own bf16 where bf16 products are native here (on a 1B-class
    bf16 parent the pass is the largest part of the default convert), else float32. Only the router's directions
    depend on it, never the exactness of the conversion."""
    import torch

    from upcycle.core.hardware import bf16_is_fast

    if ckpt.source.float_dtype() == "BF16" and bf16_is_fast("cpu"):
        return torch.bfloat16
    return torch.float32


# ------------------------------------------------------------------------------------------------ prompts:FILE

MAX_PROMPT_TOKENS = 512  # per source: enough for a mean direction, and the float64 pass stays small


def prompt_router_bases(ckpt, shared_source, texts: list[list[str]], plan, events: Events = SILENT) -> dict[int, np.ndarray]:
    """{layer: (sources, H) float32 router rows}: one row per --expert-from source, from the hidden states at the
    input of each MoE layer's MLP on that source's example texts (mergekit-moe's "hidden" gate mode, centred).

    The dense model that gives the hidden states is the one whose attention, norms and embeddings the MoE takes
    (the parent, or the mean with --average-shared), run one decoder layer at a time in float64
    (upcycle.convert.parent_pass.stream_parent): each source's texts, joined by blank lines and cut at
    MAX_PROMPT_TOKENS, form one row of a right-padded batch, so no source's tokens see another's. A source's row
    is the mean of its tokens' unit-normalised hidden states minus the mean of those means over the sources (what
    every source shares tells no expert apart), normalised, then all rows scaled as the k-means rows are: the
    router logits over all the sample's tokens have unit standard deviation.
    """
    import torch

    from upcycle.convert.parent_pass import stream_parent
    from upcycle.core.loading import load_tokenizer

    events.info(f"router init: the hidden states of {len(texts)} sources' example texts")
    tok = load_tokenizer(ckpt.load_spec)
    ids = [tok("\n\n".join(t)).input_ids[:MAX_PROMPT_TOKENS] for t in texts]
    for spec, row in zip(plan.recipe.expert_from, ids):
        if not row:
            raise InputError(f"--router-init prompts: the texts of {spec!r} give no tokens")
    lengths = [len(r) for r in ids]
    batch = np.zeros((len(ids), max(lengths)), np.int64)  # right padding: causal attention never looks ahead
    for j, row in enumerate(ids):
        batch[j, :len(row)] = row
    moe_layers = set(plan.moe_layers)
    bases: dict[int, np.ndarray] = {}

    def on_mlp(i: int, x, y) -> None:
        if i not in moe_layers:
            return
        x = x.reshape(len(ids), batch.shape[1], -1)
        tokens = [x[j, :n] for j, n in enumerate(lengths)]
        means = torch.stack([torch.nn.functional.normalize(t, dim=-1).mean(0) for t in tokens])
        if len(tokens) > 1:
            means = means - means.mean(0, keepdim=True)
        rows = torch.nn.functional.normalize(means, dim=-1)
        logits = torch.cat(tokens) @ rows.T
        scale = 1.0 / float(logits.std().clamp_min(1e-6))
        bases[i] = (rows * scale).numpy().astype(np.float32)

    stream_parent(ckpt, batch, None, on_mlp, source=shared_source)
    return bases
