"""`upcycle train` through the real CLI: the interface, a working run, and bad input answered with one clear line
and a non-zero exit code before any weight is loaded."""

from __future__ import annotations

import json

import pytest

from tests.tiny import one_line
from typer.testing import CliRunner

from upcycle.core.assets import stdlib_dir
from upcycle.cli import app

runner = CliRunner()
DATA = stdlib_dir() / "json"
FAST = ["--seq-len", "32", "-b", "2", "--precision", "fp32", "--experts-impl", "eager", "--eval-every", "0"]


def run(*args):
    result = runner.invoke(app, ["train", *map(str, args)], env={"COLUMNS": "200"})
    assert "Traceback" not in result.output
    return result


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if the command gets as far as loading weights."""
    import upcycle.train.model as model

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the bad input was reported")

    monkeypatch.setattr(model, "load_for_training", refuse)


def test_help_lists_the_interface():
    r = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for opt in ("--data", "--out", "--steps", "--tokens", "--seq-len", "--batch-size", "--grad-accum", "--lr",
                "--warmup-steps", "--min-lr-ratio", "--weight-decay", "--grad-clip", "--save-every",
                "--keep-checkpoints", "--resume", "--seed", "--aux-loss-coef", "--z-loss-coef", "--router-jitter",
                "--capacity-factor", "--aux-free-bias", "--bias-update-rate", "--train", "--router-lr-mult",
                "--precision", "--gradient-checkpointing", "--experts-impl", "--save-dtype", "--eval-every"):
        assert opt in r.output, opt


def test_cli_run(tiny_moe, tmp_path):
    out = tmp_path / "run"
    r = run(tiny_moe, "-d", DATA, "-o", out, "--steps", "2", "--save-every", "1", *FAST)
    assert r.exit_code == 0, r.output
    assert "trained 2 steps (128 tokens in all)" in one_line(r.output)
    assert (out / "checkpoint-1").is_dir() and (out / "checkpoint-2").is_dir() and (out / "final").is_dir()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # continue the finished run with a larger budget: resumes from its newest checkpoint
    r = run(tiny_moe, "-d", DATA, "-o", out, "--steps", "3", "--resume", *FAST)
    assert r.exit_code == 0, r.output
    assert "trained 1 steps (192 tokens in all)" in one_line(r.output)


def test_auto_precision_follows_the_hardware(tiny_moe, tmp_path, monkeypatch):
    """--precision defaults to auto, which writes the precision it chose to run.json: bf16 only where the
    device runs bf16 matmuls natively (probed, so both answers are forced here)."""
    import upcycle.core.hardware as hw

    fast = [a for a in FAST if a not in ("--precision", "fp32")]
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(hw, "bf16_is_fast", lambda device="cpu", native=native: native)
        out = tmp_path / expected
        r = run(tiny_moe, "-d", DATA, "-o", out, "--steps", "1", *fast)
        assert r.exit_code == 0, r.output
        assert json.loads((out / "run.json").read_text())["config"]["precision"] == expected


def _bert(tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (d / "model.safetensors").write_bytes(b"\x02" + b"\0" * 7 + b"{}")  # a whole safetensors file with no tensor
    return d


@pytest.mark.parametrize("case,code,message", [
    ("no_data", 1, "no such file or folder"),
    ("empty_data", 1, "folder holds no usable data files"),
    ("tiny_data", 1, "data too small for one block of 32 tokens"),
    ("bad_data_type", 1, "unsupported file type '.bin'"),
    ("no_model", 1, "no such file or folder"),
    ("not_a_model", 1, "has no config.json: not a Hugging Face model folder"),
    ("unsupported_model", 1, "is a bert model: upcycle train takes an MoE model of type mixtral"),
    ("offline_hub_model", 1, "cannot read a model config for someone/not-a-model"),
    ("resume_nothing", 1, "nothing to resume:"),
    ("resume_empty", 1, "holds no complete checkpoint-STEP folder"),
    ("not_empty", 1, "is not empty (notes.txt); pass --resume"),
    ("out_is_file", 1, "is a file, not a folder"),
    ("two_budgets", 2, "give exactly one budget: --steps N or --tokens N"),
    ("no_budget", 2, "give exactly one budget"),
    ("bad_tokens", 2, "--tokens 'lots': expected a number like 500000, 20M or 1.5B"),
    ("zero_steps", 2, "--steps 0 must be at least 1"),
    ("short_seq", 2, "--seq-len must be at least 2"),
    ("bad_lr", 2, "--lr -1 must be a positive number"),
    ("fp16", 2, "--precision 'fp16': use auto, bf16 or fp32"),
    ("bad_impl", 2, "--experts-impl 'fast': use auto, upcycle, grouped_mm"),
    ("bad_capacity", 2, "--capacity-factor 0 must be positive (leave it out for dropless)"),
    ("bad_jitter", 2, "--router-jitter 1 must be in [0, 1)"),
    ("train_all_and_router", 2, "--train all trains everything; it cannot be combined"),
    ("train_unknown", 2, "--train 'mlp': use all, router"),
    ("router_mult_without_router", 2, "--router-lr-mult is set but --train does not train the router"),
    ("eval_without_heldout", 2, "--eval-every needs a held-out split"),
    ("aux_free_on_mixtral", 2, "--aux-free-bias needs a model type that stores a selection bias (glm4_moe, dots1)"),
    ("moe_options_on_dense", 2, "--capacity-factor, --train router only apply to a Mixture-of-Experts model"),
    ("tracker_missing", 2, "--report-to wandb needs the wandb package"),
    ("fsdp_on_cpu", 2, "FSDP needs GPUs (accelerate runs it on accelerators only)"),
])
def test_bad_input(case, code, message, tiny_moe, tiny_parent, tmp_path, monkeypatch, no_weights):
    import importlib.util

    model, data, out, extra = tiny_moe, DATA, tmp_path / "run", ["--steps", "2"]
    if case == "no_data":
        data = tmp_path / "missing"
    elif case == "empty_data":
        data = tmp_path / "empty"
        data.mkdir()
    elif case == "tiny_data":
        data = tmp_path / "tiny.txt"
        data.write_text("x = 1\n")
    elif case == "bad_data_type":
        data = tmp_path / "blob.bin"
        data.write_bytes(b"\0" * 10)
    elif case == "no_model":
        model = tmp_path / "nope"
    elif case == "not_a_model":
        model = tmp_path
    elif case == "unsupported_model":
        model = _bert(tmp_path)
    elif case == "offline_hub_model":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        model = "someone/not-a-model"
    elif case == "resume_nothing":
        extra += ["--resume"]
    elif case == "resume_empty":
        out.mkdir()
        extra += ["--resume"]
    elif case == "not_empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "out_is_file":
        out.write_text("x")
    elif case == "two_budgets":
        extra += ["--tokens", "1M"]
    elif case == "no_budget":
        extra = []
    elif case == "bad_tokens":
        extra = ["--tokens", "lots"]
    elif case == "zero_steps":
        extra = ["--steps", "0"]
    elif case == "short_seq":
        extra += ["--seq-len", "1"]
    elif case == "bad_lr":
        extra += ["--lr", "-1"]
    elif case == "fp16":
        extra += ["--precision", "fp16"]
    elif case == "bad_impl":
        extra += ["--experts-impl", "fast"]
    elif case == "bad_capacity":
        extra += ["--capacity-factor", "0"]
    elif case == "bad_jitter":
        extra += ["--router-jitter", "1"]
    elif case == "train_all_and_router":
        extra += ["--train", "all,router"]
    elif case == "train_unknown":
        extra += ["--train", "mlp"]
    elif case == "router_mult_without_router":
        extra += ["--train", "experts", "--router-lr-mult", "10"]
    elif case == "eval_without_heldout":
        extra += ["--eval-every", "5", "--heldout-fraction", "0"]
    elif case == "aux_free_on_mixtral":
        extra += ["--aux-free-bias"]
    elif case == "moe_options_on_dense":
        model = tiny_parent("llama")
        extra += ["--capacity-factor", "1.25", "--train", "router"]
    elif case == "tracker_missing":
        if importlib.util.find_spec("wandb"):
            pytest.skip("wandb is installed")
        extra += ["--report-to", "wandb"]
    elif case == "fsdp_on_cpu":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
        monkeypatch.setattr("upcycle.train.loop._cpu_only", lambda: True)
    existed = out.exists()
    quiet_eval = [] if case == "eval_without_heldout" else ["--eval-every", "0"]
    r = run(model, "-d", data, "-o", out, "--seq-len", "32", *quiet_eval, *extra)
    assert r.exit_code == code, r.output
    text = one_line(r.output)
    assert message in text, text
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    if not existed:
        assert not out.exists()


def test_resume_with_another_model(tiny_moe, tiny_parent, tmp_path, no_weights):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"config": {"model": str(tiny_moe)}}))
    (out / "checkpoint-1").mkdir()
    (out / "checkpoint-1" / "trainer_state.json").write_text("{}")
    r = run(tiny_parent("llama"), "-d", DATA, "-o", out, "--steps", "2", "--resume")
    assert r.exit_code == 2 and f"--resume: {out} trains {tiny_moe}, not" in one_line(r.output)


def test_train_selection_that_does_not_fit_the_model(tiny_moe, tmp_path):
    r = run(tiny_moe, "-d", DATA, "-o", tmp_path / "run", "--steps", "1", "--train", "experts:0=9", *FAST)
    assert r.exit_code == 2 and "--train: layer 0 has 4 experts; no expert 9" in one_line(r.output)
