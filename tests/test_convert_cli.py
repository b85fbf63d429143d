"""`upcycle convert` through the real CLI: exit codes and one-line messages, no tracebacks, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from upcycle.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, ["convert", *map(str, args)])
    assert "Traceback" not in result.output
    return result


def test_help_lists_the_interface():
    r = runner.invoke(app, ["convert", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for opt in ("--experts", "--top-k", "--granularity", "--shared-experts", "--format", "--moe-layers", "--router-init",
                "--expert-init", "--seed", "--dtype", "--max-shard-size", "--overwrite", "--dry-run", "--verify"):
        assert opt in r.output


def test_convert_and_verify(tiny_parent, tmp_path):
    r = run(tiny_parent("llama"), tmp_path / "m", "--experts", "4", "--top-k", "2")
    assert r.exit_code == 0, r.output
    assert "verified (exact)" in r.output and (tmp_path / "m" / "model.safetensors").is_file()
    # the default k-means router runs the parent: the summary says what that cost and how to skip it
    assert "router: k-means of the parent's hidden states (" in r.output
    assert "--router-init random skips it" in r.output
    r = run(tiny_parent("llama"), tmp_path / "r", "--experts", "4", "--top-k", "2", "--router-init", "random",
            "--no-verify")
    assert r.exit_code == 0, r.output
    assert "router: k-means" not in r.output


def test_python_dash_m_works(tiny_parent, tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "upcycle", "convert", str(tiny_parent("llama")), str(tmp_path / "m"),
                          "--no-verify", "--dry-run"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "mixtral" in res.stdout


@pytest.mark.parametrize("args,code,message", [
    (["--top-k", "9"], 2, "--top-k 9 is larger than --experts 8"),
    (["--granularity", "3", "--experts", "6", "--top-k", "3"], 2, "--granularity 3 does not divide the intermediate size 128"),
    (["--experts", "6", "--top-k", "2", "--granularity", "4"], 2, "must be multiples of the virtual-group size 4"),
    (["--shared-experts", "3", "--granularity", "2"], 2, "shared experts must be fewer than G"),
    (["--format", "mixtral", "--shared-experts", "1", "--granularity", "2", "--experts", "4"], 1,
     "--format mixtral cannot hold this llama parent exactly: mixtral has no shared experts; types that fit: qwen2_moe"),
    (["--format", "nope"], 2, "unknown --format 'nope'"),
    (["--moe-layers", "0,7"], 2, "layer 7 is outside 0..1"),
    (["--expert-init", "drop:1.5"], 2, "drop:R needs 0 < R <= 1"),
    (["--router-init", "magic"], 2, "use auto, random, kmeans (a built-in text sample) or kmeans:TEXT"),
    (["--max-shard-size", "lots"], 2, "not a size"),
    (["--require-exact", "--routing", "softmax"], 2,
     "--require-exact: this recipe is not exact (--routing softmax reproduces the parent only with a zero router"),
    (["--require-exact", "--expert-init", "drop:0.5"], 2, "not exact (expert init drop:0.5 perturbs experts on purpose); use --expert-init copy"),
    (["--dtype", "int8"], 2, "unknown --dtype"),
])
def test_bad_options(tiny_parent, tmp_path, args, code, message):
    r = run(tiny_parent("llama"), tmp_path / "m", *args)
    assert r.exit_code == code, r.output
    assert message in " ".join(r.output.split())
    assert not (tmp_path / "m").exists()


def test_missing_parent(tmp_path):
    r = run(tmp_path / "nope", tmp_path / "m")
    assert r.exit_code == 1 and "no such file or folder" in r.output


def test_offline_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = run("someone/not-a-model", tmp_path / "m")
    assert r.exit_code == 1 and "could not be fetched from the hub" in r.output


def test_not_a_causal_lm(tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 8}))
    r = run(d, tmp_path / "m")
    assert r.exit_code == 1 and "not a causal language model" in r.output and "Supported parents: llama" in " ".join(r.output.split())


def test_unsupported_architecture(tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    r = run(d, tmp_path / "m")
    assert r.exit_code == 1 and "cannot upcycle model_type 'gpt2'" in r.output


def test_output_not_empty(tiny_parent, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run(tiny_parent("llama"), out, "--no-verify")
    assert r.exit_code == 1 and "not empty; pass --overwrite" in r.output
    assert (out / "keep.txt").read_text() == "mine"
    r = run(tiny_parent("llama"), out, "--no-verify", "--overwrite")
    assert r.exit_code == 0 and not (out / "keep.txt").exists() and (out / "config.json").exists()


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_safetensors(tiny_parent, tmp_path, damage):
    parent = tmp_path / "p"
    shutil.copytree(tiny_parent("llama"), parent)
    f = parent / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000] if damage == "truncate" else data[:8] + b"{not json" + data[17:])
    r = run(parent, tmp_path / "m")
    assert r.exit_code == 1
    assert ("is truncated" if damage == "truncate" else "is corrupt") in r.output
    assert not (tmp_path / "m").exists()


def test_pickle_only_parent_needs_permission(tiny_parent, tmp_path):
    import torch
    from safetensors.torch import load_file

    parent = tmp_path / "p"
    shutil.copytree(tiny_parent("llama"), parent)
    torch.save(load_file(parent / "model.safetensors"), parent / "pytorch_model.bin")
    (parent / "model.safetensors").unlink()
    r = run(parent, tmp_path / "m", "--no-verify")
    assert r.exit_code == 1 and "--allow-pickle" in r.output
    r = run(parent, tmp_path / "m", "--allow-pickle")
    assert r.exit_code == 0, r.output
    assert "verified (exact)" in r.output


def test_no_disk_space(tiny_parent, tmp_path, monkeypatch):
    import collections

    import upcycle.convert.writer as writer

    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: collections.namedtuple("u", "total used free")(1, 1, 1000))
    r = run(tiny_parent("llama"), tmp_path / "m")
    assert r.exit_code == 1 and "not enough disk space" in r.output
    assert not (tmp_path / "m").exists()


def test_dry_run_prints_the_plan(tiny_parent, tmp_path):
    r = run(tiny_parent("qwen2"), tmp_path / "m", "--dry-run", "--experts", "6", "--top-k", "3", "--granularity", "4",
            "--shared-experts", "1")
    assert r.exit_code == 0
    out = " ".join(r.output.split())
    assert "qwen2_moe" in out and "virtual groups of 3" in out and "exact yes" in out
    assert not (tmp_path / "m").exists()
