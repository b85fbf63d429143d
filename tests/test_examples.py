"""Every recipe under examples/ runs end to end (convert -> train -> eval) on a tiny parent, through the same
library calls as on the real one; only the parent and the sizes differ."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RECIPES = sorted(p.stem for p in EXAMPLES.glob("0*.py"))


def _load(name: str):
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(EXAMPLES))


def test_all_recipes_listed():
    assert RECIPES == ["01_coarse_8x_top2", "02_fine_grained_shared", "03_drop_upcycling", "04_partial_layers",
                       "05_domain_finetune", "06_branch_train_mix"]


# The first recipe runs in the default test job; the others, which take the same path with other options
# (each of those options has its own exactness test), run in the slow job.
@pytest.mark.parametrize("name", [n if n.startswith("01") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in RECIPES])
def test_recipe_runs(name, tiny_parent, tmp_path):
    parent = tiny_parent("llama")
    work = tmp_path / name
    mod = _load(name)
    sys.path.insert(0, str(EXAMPLES))
    try:
        mod.main(["--parent", str(parent), "--work", str(work), "--steps", "2", "--seq-len", "32",
                  "--batch-size", "2", "--eval-blocks", "4"])
    finally:
        sys.path.remove(str(EXAMPLES))
    report = json.loads((work / "report" / "report.json").read_text())
    assert report["model"]["loss"] > 0 and report["parent"]["loss"] > 0
    manifest = json.loads((work / "moe" / "upcycle.json").read_text())
    assert (work / "run" / "final" / "config.json").is_file()
    metrics = (work / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2
    if name == "03_drop_upcycling":
        assert "drop" in json.dumps(manifest)
    if name == "06_branch_train_mix":
        assert [s["source"] for s in manifest["sources"]] == [str(parent)] + [
            str(work / f"branch-{d}" / "final") for d in ("code", "prose")]
        assert manifest["recipe"]["average_shared"] and manifest["verification"]["mixed"]["tokens"] > 0
        summary = json.loads((work / "summary.json").read_text())
        assert set(summary) == {"code", "prose"}
        for row in summary.values():
            assert all(row[k] > 0 for k in ("parent", "branch-code", "branch-prose", "MoE"))
        for d in ("code", "prose"):
            assert len((work / f"branch-{d}" / "metrics.jsonl").read_text().splitlines()) == 2
    if name == "05_domain_finetune":
        selection = json.loads((work / "domain-report" / "domain_experts.json").read_text())
        assert selection
