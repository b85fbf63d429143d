"""README.md and docs/ against the results they quote: every measured table is what benchmarks/tables.py makes from
docs/results (a stale one fails), every results file is linked from a page and records how it was made, every
relative link resolves, and no page talks about how the project was made instead of what ran."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

import _results  # noqa: E402
import tables  # noqa: E402

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def pages(root: Path = ROOT) -> list[Path]:
    return tables.pages(root)


def links(page: Path) -> list[str]:
    text = page.read_text()
    # links inside code are examples, not references
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return [m.group(1) for m in LINK.finditer(text)]


def local_targets(page: Path) -> list[tuple[str, Path]]:
    out = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        out.append((target, (page.parent / target.split("#", 1)[0]).resolve()))
    return out


def results_files() -> list[Path]:
    return sorted(p for p in RESULTS.rglob("*") if p.is_file())


def copy_checkout(tmp_path: Path) -> Path:
    """README.md and docs/ (with the results) in a scratch root, for tests that change them."""
    root = tmp_path / "checkout"
    root.mkdir()
    shutil.copy(ROOT / "README.md", root / "README.md")
    shutil.copytree(ROOT / "docs", root / "docs")
    return root


def test_every_table_is_generated_from_its_results_file():
    assert tables.run(ROOT, check=True) == 0, "run python benchmarks/tables.py"


def test_a_stale_table_is_named(tmp_path, capsys):
    root = copy_checkout(tmp_path)
    # a number typed into a table by hand
    page = root / "docs" / "speed.md"
    text = page.read_text()
    block = re.search(r"<!-- table: train-xeon-amx -->\n(.*?)<!-- /table -->", text, re.S).group(1)
    row = next(line for line in block.splitlines() if line.startswith("| 8x top-2 MoE"))
    page.write_text(text.replace(row, row.replace("| upcycle |", "| upcycle | 9", 1), 1))
    assert tables.run(root, check=True) == 1
    assert "docs/speed.md: train-xeon-amx" in capsys.readouterr().err
    # --check changed nothing; a rewrite makes the page current again
    assert "| upcycle | 9" in page.read_text()
    assert tables.run(root, check=False) == 0
    assert tables.run(root, check=True) == 0


def test_a_changed_results_file_makes_its_tables_stale(tmp_path, capsys):
    root = copy_checkout(tmp_path)
    path = root / "docs" / "results" / "bench_train" / "xeon-amx.json"
    d = json.loads(path.read_text())
    d["results"][1]["tokens_per_s"] *= 2
    path.write_text(json.dumps(d))
    assert tables.run(root, check=True) == 1
    err = capsys.readouterr().err
    # the machine's own table and the README's summary both quote it
    assert "docs/speed.md: train-xeon-amx" in err and "README.md: train-summary" in err


def test_an_unknown_or_unused_table_is_refused(tmp_path, capsys):
    root = copy_checkout(tmp_path)
    page = root / "docs" / "index.md"
    page.write_text(page.read_text() + "\n<!-- table: no-such-table -->\n<!-- /table -->\n")
    assert tables.run(root, check=True) == 2
    assert "no-such-table" in capsys.readouterr().err
    page.write_text(page.read_text().replace("<!-- table: no-such-table -->\n<!-- /table -->\n", ""))
    speed = root / "docs" / "speed.md"
    speed.write_text(re.sub(r"<!-- table: train-phases -->\n.*?<!-- /table -->\n", "", speed.read_text(), flags=re.S))
    assert tables.run(root, check=True) == 2
    assert "train-phases" in capsys.readouterr().err


def test_every_results_file_is_linked_from_a_page():
    linked = {target for page in pages() for _, target in local_targets(page)}
    missing = [p.relative_to(ROOT).as_posix() for p in results_files()
               if "archive" not in p.relative_to(RESULTS).parts and p.resolve() not in linked]
    assert not missing, f"results files no page links to: {missing}"


def test_every_results_file_records_how_it_was_made():
    files = [p for p in results_files() if p.suffix == ".json"]
    assert files
    for p in files:
        d = json.loads(p.read_text())
        rel = p.relative_to(RESULTS)
        assert set(_results.KEYS) <= set(d), f"{rel}: missing {set(_results.KEYS) - set(d)}"
        assert set(_results.MACHINE_KEYS) <= set(d["machine"]), rel
        assert d["benchmark"] == rel.parts[-2], rel
        # the file's name starts with the machine it ran on
        assert p.stem == d["machine"]["slug"] or p.stem.startswith(d["machine"]["slug"] + "-"), rel
        assert d["command"] and d["command"].startswith("python benchmarks/"), rel
        if "legacy" in d:  # written before the metadata was recorded: what is unknown is null, never guessed
            assert re.fullmatch(r"[0-9a-f]{12}", d["legacy"]["added_in_commit"]), rel
        else:
            assert d["machine"]["cpu"] and d["machine"]["flags"] is not None, rel
            assert d["commit"]["sha"] and d["date"], rel
        # where the command names its output file, that is this file
        out = re.search(r"--json (\S+)", d["command"])
        assert out is None or out.group(1) == p.relative_to(ROOT).as_posix(), rel


def test_relative_links_resolve():
    broken = [f"{page.relative_to(ROOT)}: {target}" for page in pages() for target, path in local_targets(page)
              if not path.exists()]
    assert not broken, broken


def test_no_page_is_about_how_the_project_was_made():
    words = re.compile(r"session|issue [0-9]", re.I)
    hits = [p.relative_to(ROOT).as_posix() for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*"))]
            if p.is_file() and p.suffix in (".md", ".json") and words.search(p.read_text())]
    assert not hits, hits


def test_readme_keeps_the_ci_test_command():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- ci:test -->\n```bash\n(.+)\n```", text)
    assert m and m.group(1).endswith(".venv/bin/pytest -q")


# ---------------------------------------------------------------------------------------- benchmarks/_results.py

@pytest.mark.parametrize("cpu,flags,slug", [
    ("Intel(R) Xeon(R) Platinum 8480+", ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"], "xeon-amx"),
    ("AMD EPYC 9R14 96-Core Processor", ["avx2", "avx512f", "avx512_bf16"], "epyc-avx512bf16"),
    ("AMD EPYC 7R13 Processor", ["avx2"], "epyc-avx2"),
    ("Intel(R) Xeon(R) Processor @ 2.80GHz", ["avx2", "avx512f"], "xeon-avx512"),
])
def test_machine_slug_names_the_family_and_its_best_isa(cpu, flags, slug):
    assert _results.machine_slug(cpu, flags) == slug


def test_a_run_writes_its_metadata_first_and_refuses_to_hide_it(tmp_path, monkeypatch):
    monkeypatch.setattr(_results, "RESULTS", tmp_path / "results")
    run = _results.Run("bench_x", argv=["benchmarks/bench_x.py", "--steps", "3"])
    assert run.meta["command"] == "python benchmarks/bench_x.py --steps 3"
    slug = run.meta["machine"]["slug"]
    assert run.path(None) == tmp_path / "results" / "bench_x" / f"{slug}.json"
    assert run.path(None, "two words") == tmp_path / "results" / "bench_x" / f"{slug}-two-words.json"
    assert run.path(None, default=False) is None and run.write({"rows": []}, None) is None
    assert run.path(tmp_path / "given.json", default=False) == tmp_path / "given.json"
    out = run.write({"rows": [1]}, run.path(None), machine_extra={"capability": "AVX2"})
    d = json.loads(out.read_text())
    assert list(d)[:len(_results.KEYS)] == list(_results.KEYS) and d["rows"] == [1]
    assert d["machine"]["capability"] == "AVX2" and "capability" not in run.meta["machine"]
    with pytest.raises(ValueError, match="command"):
        run.write({"command": "x"}, tmp_path / "y.json")
    assert not (tmp_path / "y.json").exists()


# ---------------------------------------------------------------------------------------- the demo's excerpt

SUMMARY = """# upcycle eval: `upcycle-demo/run/final`

Upcycling did not pay off: the dense baseline trained the same way is better.

Data: 32 blocks of 256 tokens.

| metric | model | parent | model vs parent |
|---|---|---|---|
| loss | 2.40 | 2.48 | -0.08 |

Intervals are 95% Student-t intervals over blocks.
"""


def test_the_demo_table_waits_for_a_recorded_run_then_quotes_it(tmp_path):
    import demo_run

    root = copy_checkout(tmp_path)
    shutil.rmtree(root / "docs" / "results" / "demo_run", ignore_errors=True)
    readme = root / "README.md"
    assert "No run of the demo is recorded" in tables.TABLES["demo"](tables.Ctx(root, readme))
    ex = demo_run.excerpt(SUMMARY)
    assert ex["verdict"].startswith("Upcycling did not pay off") and len(ex["table"]) == 3
    run = _results.Run("demo_run", argv=["benchmarks/demo_run.py"])
    path = root / "docs" / "results" / "demo_run" / "x.json"
    run.write({"wall_s": 600.0, "peak_rss_kib": 7 * 2**20, "demo": {}, "summary_md": ex, "plot": "x.png"}, path)
    text = tables.TABLES["demo"](tables.Ctx(root, readme))
    assert "10.0 min" in text and "7.00 GiB" in text and "> Upcycling did not pay off" in text
    assert "| loss | 2.40 |" in text and "(docs/results/demo_run/x.png)" in text
    # a run of the README's first command on a fresh clone says so, with the demo's share of the time
    first = demo_run.readme_first_command((ROOT / "README.md").read_text())
    assert "upcycle demo" in first and "pip install" in first
    run.write({"wall_s": 660.0, "peak_rss_kib": 7 * 2**20, "demo": {}, "summary_md": ex, "readme_command": first,
               "fresh_clone": True, "demo_s": 540.0}, path)
    text = tables.TABLES["demo"](tables.Ctx(root, readme))
    assert "fresh clone" in text and "took 11.0 min, of which the demo 9.0 min" in text
