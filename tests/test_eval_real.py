"""upcycle eval on the real parent, SmolLM2-135M (GGUF from PyPI), and real text (the standard library)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from upcycle.cli import app


@pytest.mark.slow
def test_smollm2_fresh_moe_scores_like_its_parent(smollm2_gguf, tmp_path):
    from upcycle.core.assets import stdlib_split
    from upcycle.convert import convert
    from upcycle.core.loading import export_dense

    parent = export_dense(smollm2_gguf, tmp_path / "dense")
    moe = tmp_path / "moe"
    convert(parent, moe, experts=4, top_k=2, verify=False, quiet=True)
    _, heldout = stdlib_split()
    out = tmp_path / "rep"
    res = CliRunner().invoke(app, ["eval", str(moe), "--parent", str(parent), *[a for f in heldout[:3] for a in ("--data", str(f))],
                                   "--split", "all", "--seq-len", "128", "--max-blocks", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "report.json").read_text())
    assert r["comparison"]["verdict"] == "same" and r["comparison"]["max_abs_block_diff"] < 1e-4
    assert 1.0 < r["parent"]["loss"] < 4.0  # a real model on Python source, not a random one (ln 49152 = 10.8)
    assert len(r["routing"]["layers"]) == 30
    assert all(min(lay["drift"]["cos"]) > 0.999999 for lay in r["routing"]["layers"])
    assert r["model"]["params"]["active_per_token"] < r["model"]["params"]["total"]
