"""Intervals over documents: the cluster-robust paired interval worked by hand, the minimum number of documents,
how `upcycle eval` spreads its blocks over documents and names each block's document, and the study scripts that
pool and recompute with them."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tests.tiny import byte_tokenizer
from upcycle.evaluate.stats import MIN_DOCUMENTS, clustered_mean_ci, mean_ci, paired_comparison, t975

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_clustered_interval_by_hand():
    # two documents of two blocks each: residuals from the mean 2.5 are -1.5, -0.5 | +0.5, +1.5
    est = clustered_mean_ci([1.0, 2.0, 3.0, 4.0], ["a", "a", "b", "b"])
    se = math.sqrt(2 / 1 * ((-2.0) ** 2 + 2.0 ** 2)) / 4  # G/(G-1) * sum of squared cluster sums, over n
    assert est.mean == 2.5 and est.documents == 2 and est.n == 4
    assert (est.low, est.high) == (pytest.approx(2.5 - 12.706 * se), pytest.approx(2.5 + 12.706 * se))
    # one block per document: exactly the interval over blocks
    same = clustered_mean_ci([1.0, 2.0, 3.0, 4.0], ["a", "b", "c", "d"])
    plain = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert (same.low, same.high) == (pytest.approx(plain.low), pytest.approx(plain.high))
    # one document: a mean and no interval
    one = clustered_mean_ci([1.0, 2.0], ["a", "a"])
    assert one.low is None and one.documents == 1


def test_correlated_blocks_widen_the_interval():
    """Blocks of one document that move together: over blocks the difference looks significant, over documents
    (the unit that varies independently) it is not."""
    docs = [f"d{i}" for i in range(12) for _ in range(5)]
    shift = {f"d{i}": (0.02 if i % 2 else -0.005) for i in range(12)}  # whole documents better or worse
    diffs = [shift[d] + 0.001 * (j % 5 - 2) for j, d in enumerate(docs)]
    parent = [2.0] * len(diffs)
    model = [2.0 + x for x in diffs]
    blocks = paired_comparison(model, parent, 1e-4)
    over_docs = paired_comparison(model, parent, 1e-4, documents=docs)
    assert blocks.verdict == "worse" and over_docs.verdict == "no significant difference"
    assert over_docs.diff.mean == pytest.approx(blocks.diff.mean)
    assert over_docs.block_diff == blocks.diff and over_docs.diff.documents == 12
    assert over_docs.to_json()["interval_over"] == "documents" and over_docs.to_json()["loss_diff_over_blocks"]


def test_fewer_documents_than_the_minimum_give_no_verdict():
    n = 20
    parent = [2.0 + 0.01 * (i % 3) for i in range(n)]
    model = [p - 0.1 for p in parent]
    docs = [f"d{i % (MIN_DOCUMENTS - 1)}" for i in range(n)]
    assert paired_comparison(model, parent, 1e-4, documents=docs).verdict == "too few documents"
    docs = [f"d{i % MIN_DOCUMENTS}" for i in range(n)]
    assert paired_comparison(model, parent, 1e-4, documents=docs).verdict == "better"
    # the same model needs no interval
    same = paired_comparison([p + 1e-7 for p in parent], parent, 1e-4, documents=["d"] * n)
    assert same.verdict == "same"


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("d") / "docs.jsonl"
    # 30 documents of 100 to 390 bytes: several 16-token blocks each
    p.write_text("".join(json.dumps({"text": f"document {i}: " + " ".join(str(i * 7919 + 13 * j) for j in range(20 + 3 * i))})
                         + "\n" for i in range(30)))
    return p


def test_spread_blocks_take_every_document_once_before_any_twice(docs_file):
    from upcycle.core.data import heldout_block_documents, spread_blocks

    tok = byte_tokenizer()
    blocks, docs = spread_blocks(tok, [docs_file], seq_len=16, max_blocks=40, split="all")
    assert blocks.shape == (40, 16) and len(docs) == 40
    assert len(set(docs)) == 30 and all(d.startswith(f"{docs_file}#") for d in docs)
    counts = {d: docs.count(d) for d in set(docs)}
    assert max(counts.values()) - min(counts.values()) <= 1  # one of each, then a second of ten
    again, again_docs = spread_blocks(tok, [docs_file], seq_len=16, max_blocks=40, split="all")
    assert (again == blocks).all() and again_docs == docs
    # the consecutive selection of heldout_blocks reads the first documents only
    _, first = heldout_block_documents(tok, [docs_file], seq_len=16, max_blocks=40, split="all")
    assert len(set(first)) < 15
    # every chosen block is a block of the stream, and its document is the one that gave it most tokens
    stream, stream_docs = heldout_block_documents(tok, [docs_file], seq_len=16, max_blocks=10_000, split="all")
    rows = {tuple(b.tolist()): d for b, d in zip(stream, stream_docs)}
    assert all(rows[tuple(b.tolist())] == d for b, d in zip(blocks, docs))


def test_block_document_is_the_majority_document():
    from upcycle.core.data import block_document

    assert block_document([("a", 3), ("b", 10), ("c", 3)]) == "b"
    assert block_document([("a", 5), ("b", 3), ("a", 4)]) == "a"
    assert block_document([("a", 4), ("b", 4)]) == "a"


def test_study_pool_uses_the_documents_degrees_of_freedom():
    from study_pool import pool

    a = {"mean": -0.002, "ci95": [-0.004, 0.0], "blocks": 64, "documents": 12}
    b = {"mean": -0.001, "ci95": [-0.003, 0.001], "blocks": 64, "documents": 17}
    got = pool([a, b])
    se_a, se_b = 0.002 / t975(11), 0.002 / t975(16)
    se = (1 / se_a**2 + 1 / se_b**2) ** -0.5
    mean = (-0.002 / se_a**2 - 0.001 / se_b**2) / (1 / se_a**2 + 1 / se_b**2)
    assert got["mean"] == pytest.approx(mean) and got["documents"] == 29
    assert got["ci95"] == pytest.approx([mean - t975(27) * se, mean + t975(27) * se])


def test_study_documents_recomputes_from_recorded_block_losses():
    from study_documents import recompute

    docs = [f"f{i % 4}.py" for i in range(16)]
    paired = {"block_loss_moe": [2.0 - 0.01 + 0.001 * (i % 3) for i in range(16)],
              "block_loss_dense": [2.0] * 16, "block_document": docs}
    got = recompute(paired, docs)
    assert got["documents"]["documents"] == 4 and got["verdict"] == "too few documents"
    assert got["blocks"]["documents"] is None and got["blocks"]["n"] == 16
