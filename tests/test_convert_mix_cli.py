"""`upcycle convert --expert-from` through the real CLI: what it prints, and one clear line for each bad input, with
nothing written and, where the check needs none, no weight read."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tests.tiny import make_dense_parent, one_line
from upcycle.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, ["convert", *map(str, args)], env={"COLUMNS": "200"})
    assert "Traceback" not in result.output
    return result


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    """The parent, two same-shaped sources, and parents that do not fit it."""
    root = tmp_path_factory.mktemp("mixcli")
    return {
        "base": make_dense_parent(root / "base", "llama", seed=0),
        "a": make_dense_parent(root / "a", "llama", seed=1),
        "b": make_dense_parent(root / "b", "llama", seed=2),
        "qwen2": make_dense_parent(root / "qwen2", "qwen2", seed=3),
        "wide": make_dense_parent(root / "wide", "llama", seed=4, intermediate_size=256),
        "short": make_dense_parent(root / "short", "llama", seed=5, num_hidden_layers=1),
        "deep": make_dense_parent(root / "deep", "llama", seed=6, num_hidden_layers=3),
        "gelu": make_dense_parent(root / "gelu", "llama", seed=7, hidden_act="gelu"),
    }


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Any tensor read fails the test: the checks must work from headers and config files alone."""
    from upcycle.storage import sources

    def refuse(self, name):
        raise AssertionError(f"read {name} before the inputs were checked")

    for cls in (sources.SafetensorsSource, sources.GGUFSource, sources.PickleSource):
        monkeypatch.setattr(cls, "read", refuse)


def test_help_lists_the_options():
    r = runner.invoke(app, ["convert", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "--expert-from" in r.output and "--average-shared" in r.output
    assert "prompts:FILE" in one_line(r.output)


def test_cli_builds_the_recipe(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from upcycle.convert import ConvertOptions
    from upcycle.convert.recipe import Recipe

    seen = []
    monkeypatch.setattr("upcycle.convert.convert", lambda *a, **k: seen.append(a) or
                        SimpleNamespace(options=SimpleNamespace(dry_run=False)))
    monkeypatch.setattr("upcycle.cli.show.show", lambda *a: None)
    r = run("p", tmp_path / "o", "-e", "2", "--expert-from", "x", "--expert-from", "y.gguf", "--average-shared")
    assert r.exit_code == 0, r.output
    assert seen[0][1] == ConvertOptions(out=tmp_path / "o", recipe=Recipe(experts=2, expert_from=("x", "y.gguf"),
                                                                          average_shared=True))


def test_dry_run_shows_the_sources(parents, tmp_path):
    r = run(parents["base"], tmp_path / "m", "--dry-run", "-e", "4", "-k", "2", "--expert-from", parents["a"],
            "--expert-from", parents["base"], "--average-shared")
    assert r.exit_code == 0, r.output
    out = one_line(r.output)
    assert f"experts from {parents['a']}: experts 0-1" in out
    assert f"experts from {parents['base']}: experts 2-3 (the parent itself)" in out
    assert "other weights the mean over the parent and 1 distinct source(s)" in out
    assert "exact no: experts come from 1 checkpoint(s) other than the parent" in out
    assert not (tmp_path / "m").exists()


def test_convert_prints_the_measured_distance(parents, tmp_path):
    r = run(parents["base"], tmp_path / "m", "-e", "2", "-k", "1", "--expert-from", parents["a"], "--expert-from",
            parents["b"], "--full-check", "never")
    assert r.exit_code == 0, r.output
    out = one_line(r.output)
    assert "verified (not the parent's function: experts from other checkpoints)" in out
    v = json.loads((tmp_path / "m" / "upcycle.json").read_text())["verification"]["mixed"]
    assert f"mean KL(parent || MoE) {v['mean_kl']:.3g} nats" in out and v["mean_kl"] > 0
    r = run(parents["base"], tmp_path / "n", "-e", "2", "-k", "1", "--expert-from", parents["a"], "--expert-from",
            parents["b"], "--no-verify")
    assert r.exit_code == 0 and "this model is not the parent's function" in one_line(r.output)


@pytest.mark.parametrize("source,message", [
    ("qwen2", "is a qwen2 model and the parent is llama: every source must have the parent's architecture"),
    ("wide", "tensor model.layers.0.mlp.down_proj.weight has shape [64, 256], the parent's has [64, 128]"),
    ("short", "has no tensor model.layers.1.input_layernorm.weight, which the parent has"),
    ("deep", "has num_layers 3 and the parent 2"),
    ("gelu", "has hidden_act 'gelu' and the parent 'silu'"),
])
def test_mismatched_source_is_one_line_before_any_weight(parents, tmp_path, no_weight_reads, source, message):
    r = run(parents["base"], tmp_path / "m", "-e", "2", "--expert-from", parents["a"], "--expert-from", parents[source])
    assert r.exit_code == 1, r.output
    out = one_line(r.output)
    assert out.startswith("error:") and f"--expert-from {parents[source]}" in out and message in out
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []


def test_missing_source(parents, tmp_path):
    r = run(parents["base"], tmp_path / "m", "-e", "1", "-k", "1", "--expert-from", tmp_path / "nope")
    assert r.exit_code == 1 and f"--expert-from {tmp_path / 'nope'}: no such file or folder" in one_line(r.output)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("args,message", [
    (["-e", "3", "--expert-from", "A", "--expert-from", "B"],
     "--experts 3 with 2 --expert-from source(s): every source gives the same number of whole copies, so --experts "
     "must be a multiple of 2"),
    (["-e", "6", "-k", "2", "-g", "2", "--expert-from", "A", "--expert-from", "B"],
     "must be a multiple of 4 (2 source(s) x 2 slices per copy); e.g. --experts 4"),
    (["--average-shared"], "--average-shared averages the parent with the --expert-from checkpoints"),
    (["--router-init", "prompts:p.json"], "--router-init prompts:FILE maps --expert-from sources to texts"),
    (["-e", "4", "--expert-from", "A", "--expert-from", "B", "--router-init", "prompts:p.json"],
     "--router-init prompts gives each source one router row, and --experts 4 makes 2 copies of each; use --experts 2"),
    (["-e", "2", "--expert-from", "A", "--expert-from", "A", "--router-init", "prompts:p.json"],
     "--router-init prompts: A is given twice with --expert-from"),
    (["-e", "2", "--expert-from", "A", "--expert-from", "B", "--router-init", "prompts:p.json", "--router-std", "0",
      "--routing", "softmax", "--format", "qwen2_moe"], "--router-std 0 asks for a zero router, --router-init prompts"),
    (["--expert-from", ""], "--expert-from needs a checkpoint"),
])
def test_bad_options_exit_2(parents, tmp_path, args, message):
    r = run(parents["base"], tmp_path / "m", *args)
    assert r.exit_code == 2, r.output
    assert message in one_line(r.output)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("content,message", [
    ({"A": ["def f(): pass"]}, "gives no texts for the --expert-from source 'B'; every source needs some"),
    ({"A": ["x"], "B": ["y"], "C": ["z"]}, "names 'C', which is not an --expert-from source (sources: A, B)"),
    ({"A": ["x"], "B": []}, "the source 'B' has no texts (an empty list or only blank strings)"),
    ({"A": ["x"], "B": ["  ", ""]}, "the source 'B' has no texts"),
    ({"A": ["x"], "B": [1, 2]}, "the texts for 'B' must be a list of strings"),
    (["A", "B"], "must map each --expert-from source to a list of example texts"),
    ("{not json", "is not valid JSON"),
    (None, "no such file"),
])
def test_bad_prompts_file_is_one_line_before_any_weight(parents, tmp_path, monkeypatch, no_weight_reads, content, message):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(parents["a"], tmp_path / "A")
    shutil.copytree(parents["b"], tmp_path / "B")
    prompts = tmp_path / "p.json"
    if content is not None:
        prompts.write_text(content if isinstance(content, str) else json.dumps(content))
    r = run(parents["base"], tmp_path / "m", "-e", "2", "--expert-from", "A", "--expert-from", "B",
            "--router-init", f"prompts:{prompts}")
    assert r.exit_code == 1, r.output
    out = one_line(r.output)
    assert out.startswith("error: --router-init prompts:") and message in out
    assert not (tmp_path / "m").exists()


def test_bad_yaml_prompts_file(parents, tmp_path):
    prompts = tmp_path / "p.yaml"
    prompts.write_text("a: [unclosed\n")
    r = run(parents["base"], tmp_path / "m", "-e", "1", "-k", "1", "--expert-from", parents["a"], "--router-init",
            f"prompts:{prompts}")
    assert r.exit_code == 1 and "is not valid YAML" in one_line(r.output)
    assert not (tmp_path / "m").exists()


def test_require_exact_refuses_other_checkpoints(parents, tmp_path):
    r = run(parents["base"], tmp_path / "m", "-e", "2", "--expert-from", parents["a"], "--expert-from", parents["base"],
            "--require-exact")
    assert r.exit_code == 2 and "drop --expert-from" in one_line(r.output)
    assert not (tmp_path / "m").exists()
    r = run(parents["base"], tmp_path / "m", "-e", "2", "--expert-from", parents["base"], "--expert-from",
            parents["base"], "--require-exact", "--no-verify")
    assert r.exit_code == 0, r.output
