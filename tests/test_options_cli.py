"""The command line's contract with the library: one options object per command, built from the parsed options
as they are, validating itself on construction; shared options defined once and behaving the same everywhere;
help that reads in an 80-column terminal."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from upcycle.cli import app
from upcycle.convert import ConvertOptions
from upcycle.convert.recipe import Recipe
from upcycle.core.errors import UpcycleError, UsageError
from upcycle.demo import DemoOptions
from upcycle.evaluate.run import EvalOptions
from upcycle.train.config import TrainConfig

runner = CliRunner()
COMMANDS = ("convert", "train", "eval", "demo")


def _command(name: str) -> typer.models.CommandInfo:
    return next(c for c in app.registered_commands if c.name == name)


def _click(name: str):
    return typer.main.get_command(app).commands[name]


def _params(name: str) -> set[str]:
    return {p.name for p in _click(name).params if p.name != "help"}


def _init_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


# ---------------------------------------------------------------- one option = one field + one CLI parameter

# Fields a script may set but the CLI does not offer, and CLI parameters that only shape what is printed.
# (train's expert_lr_mult: the old name of mlp_lr_mult, which the CLI takes as a second name of --mlp-lr-mult)
LIBRARY_ONLY = {"train": {"adam_betas", "adam_eps", "expert_lr_mult"}, "eval": {"min_count"}, "convert": set(),
                "demo": set()}
CLI_ONLY = {"train": set(), "eval": {"json_out"}, "convert": set(), "demo": set()}
POSITIONAL = {"train": set(), "eval": {"model"}, "convert": {"parent"}, "demo": {"out"}}


def _options_fields(name: str) -> set[str]:
    if name == "convert":
        return _init_fields(Recipe) | (_init_fields(ConvertOptions) - {"recipe"})
    return _init_fields({"train": TrainConfig, "eval": EvalOptions, "demo": DemoOptions}[name])


@pytest.mark.parametrize("name", COMMANDS)
def test_every_cli_parameter_is_an_options_field(name):
    """The CLI builds its options object from its parameters by name: a new option is one field plus one
    parameter, and a parameter without a field (or the reverse) fails here rather than being silently dropped."""
    cli = _params(name) - CLI_ONLY[name] - POSITIONAL[name]
    assert cli == _options_fields(name) - LIBRARY_ONLY[name]


def _capture(monkeypatch, target: str, attr: str, result=None) -> list:
    import importlib

    seen = []
    monkeypatch.setattr(importlib.import_module(target), attr, lambda *a, **k: seen.append((a, k)) or result)
    return seen


def test_convert_builds_one_convert_options(monkeypatch, tmp_path):
    from types import SimpleNamespace

    seen = _capture(monkeypatch, "upcycle.convert", "convert", result=SimpleNamespace(options=SimpleNamespace(dry_run=False)))
    monkeypatch.setattr("upcycle.cli.show.show", lambda *a: None)
    r = runner.invoke(app, ["convert", "p", str(tmp_path / "o"), "-e", "16", "-k", "4", "-g", "2", "--seed", "7",
                            "--dtype", "bfloat16", "--max-shard-size", "1GB", "--no-verify", "--allow-pickle"])
    assert r.exit_code == 0, r.output
    (parent, options), kwargs = seen[0]
    assert parent == "p" and set(kwargs) == {"events"}  # progress goes to the terminal's events
    assert options == ConvertOptions(out=tmp_path / "o", recipe=Recipe(experts=16, top_k=4, granularity=2, seed=7,
                                                                       dtype="bfloat16"),
                                     max_shard_size="1GB", verify=False, allow_pickle=True)


def test_train_builds_one_train_config(monkeypatch, tmp_path):
    seen = _capture(monkeypatch, "upcycle.train", "train")
    monkeypatch.setattr("upcycle.cli.show.show", lambda *a: None)
    r = runner.invoke(app, ["train", "m", "-d", "a.txt", "-d", "b.txt", "-o", str(tmp_path / "r"), "--tokens", "2M",
                            "--train", "router", "--router-lr-mult", "10", "--seed", "3", "--allow-pickle"])
    assert r.exit_code == 0, r.output
    (cfg,), _ = seen[0]
    assert cfg == TrainConfig(model="m", data=["a.txt", "b.txt"], out=tmp_path / "r", tokens=2_000_000,
                              train=["router"], router_lr_mult=10.0, seed=3, allow_pickle=True)
    assert cfg.precision == "auto" and cfg.data == ("a.txt", "b.txt") and cfg.selection.groups == {"router"}


def test_eval_builds_one_eval_options(monkeypatch, tmp_path):
    seen = _capture(monkeypatch, "upcycle.evaluate.run", "evaluate", result=object())
    monkeypatch.setattr("upcycle.cli.show.show", lambda *a: None)
    r = runner.invoke(app, ["eval", "m", "-d", "x.txt", "-p", "parent", "-o", str(tmp_path / "rep"), "--domain", "d",
                            "--tasks", "hellaswag, arc_easy", "--seed", "5", "--dtype", "bfloat16", "--overwrite"])
    assert r.exit_code == 0, r.output
    (model, options), kwargs = seen[0]
    assert model == "m" and set(kwargs) == {"events"}
    assert options == EvalOptions(data=("x.txt",), parent="parent", out=tmp_path / "rep", domain=("d",),
                                  tasks=("hellaswag", "arc_easy"), seed=5, dtype="bfloat16", overwrite=True)


def test_demo_builds_one_demo_options(monkeypatch, tmp_path):
    seen = _capture(monkeypatch, "upcycle.demo", "run_demo")
    r = runner.invoke(app, ["demo", str(tmp_path / "d"), "-e", "4", "-k", "1", "--steps", "3", "--seed", "2"])
    assert r.exit_code == 0, r.output
    (out, options), _ = seen[0]
    assert out == tmp_path / "d" and options == DemoOptions(experts=4, top_k=1, steps=3, seed=2)


# ---------------------------------------------------------------- options objects validate themselves

def _one_line_usage_error(make, message: str) -> None:
    with pytest.raises(UpcycleError) as info:
        make()
    assert isinstance(info.value, UsageError) and info.value.exit_code == 2
    assert "\n" not in str(info.value) and message in str(info.value)


T = dict(model="m", data=["d"], out="r", steps=1)
E = dict(data=["d"])


@pytest.mark.parametrize("make,message", [
    (lambda: ConvertOptions.from_fields(out="o", max_shard_size="lots"), "--max-shard-size"),
    (lambda: ConvertOptions.from_fields(out="o", experts=4, top_k=5), "--top-k 5 is larger than --experts 4"),
    (lambda: ConvertOptions.from_fields(out="o", dtype="int8"), "unknown --dtype 'int8'"),
    (lambda: TrainConfig(model="m", data=[], out="r", steps=1), "give training text with --data"),
    (lambda: TrainConfig(model="m", data=["d"], out="r"), "give exactly one budget"),
    (lambda: TrainConfig(**{**T, "steps": None}, tokens="lots"), "expected a number like"),
    (lambda: TrainConfig(**T, lr=0.0), "--lr 0 must be a positive number"),
    (lambda: TrainConfig(**T, precision="fp16"), "--precision 'fp16': use auto, bf16 or fp32"),
    (lambda: TrainConfig(**T, train=["nope"]), "--train 'nope'"),
    (lambda: TrainConfig(**T, train=["experts"], router_lr_mult=2.0), "does not train the router"),
    (lambda: TrainConfig(**T, train=["router"], mlp_lr_mult=0.25), "--mlp-lr-mult is set but nothing of the MLP"),
    (lambda: TrainConfig(**T, train=["router"], expert_lr_mult=0.25), "--mlp-lr-mult is set but nothing of the MLP"),
    (lambda: TrainConfig(**T, expert_lr_mult=-1.0), "--mlp-lr-mult -1 must be zero or positive"),
    (lambda: TrainConfig(**T, mlp_lr_mult=0.25, expert_lr_mult=1.0), "--expert-lr-mult is the old name of"),
    (lambda: TrainConfig(**T, heldout_fraction=0.0, eval_every=5), "--eval-every needs a held-out split"),
    (lambda: EvalOptions(data=[]), "give the text to score with --data"),
    (lambda: EvalOptions(**E, split="train"), "--split 'train': use heldout or all"),
    (lambda: EvalOptions(**E, seq_len=1), "--seq-len must be at least 2"),
    (lambda: EvalOptions(**E, dtype="int8"), "unknown --dtype 'int8'"),
    (lambda: EvalOptions(**E, heldout_fraction=1.0), "--heldout-fraction 1 must be in [0, 1)"),
    (lambda: EvalOptions(**E, domain_top=0), "--domain-top must be at least 1"),
    (lambda: DemoOptions(experts=1), "--experts must be at least 2"),
    (lambda: DemoOptions(experts=4, top_k=5), "--top-k 5 is more than --experts 4"),
    (lambda: DemoOptions(precision="fp16"), "--precision 'fp16': use auto, bf16 or fp32"),
])
def test_options_objects_reject_bad_values_on_construction(make, message):
    _one_line_usage_error(make, message)


@pytest.mark.parametrize("obj", [
    ConvertOptions.from_fields(out="o"), TrainConfig(**T), EvalOptions(**E), DemoOptions()])
def test_options_objects_are_frozen(obj):
    field = dataclasses.fields(obj)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, field, getattr(obj, field))


def test_replace_validates_again():
    cfg = TrainConfig(**T)
    with pytest.raises(UsageError, match="--steps 0 must be at least 1"):
        dataclasses.replace(cfg, steps=0)


def test_convert_keyword_convenience_rejects_unknown_names():
    from upcycle.convert import convert

    with pytest.raises(TypeError, match="unknown convert option"):
        convert("p", "o", expertz=4)


# ---------------------------------------------------------------- shared options: defined once, same everywhere

SHARED = ("--seed", "--overwrite", "--allow-pickle", "--dtype", "--data", "--seq-len", "--text-field",
          "--heldout-fraction", "--experts", "--top-k", "--lr", "--precision")


def _option(command: str, flag: str):
    return next((p for p in _click(command).params if flag in p.opts), None)


@pytest.mark.parametrize("flag", SHARED)
def test_shared_options_are_the_same_option_everywhere(flag):
    users = {c: _option(c, flag) for c in COMMANDS if _option(c, flag) is not None}
    assert len(users) >= 2, f"{flag} is not shared"
    first = next(iter(users.values()))
    for command, opt in users.items():
        assert (opt.opts, opt.secondary_opts, opt.help, opt.type_descriptor.annotation, opt.multiple,
                opt.rich_help_panel) == (first.opts, first.secondary_opts, first.help, first.type_descriptor.annotation,
                                         first.multiple, first.rich_help_panel), command


def _bad_value_message(command: str, args: list[str]) -> tuple[int, str]:
    res = runner.invoke(app, [command, *args], env={"COLUMNS": "200"})
    lines = [" ".join(line.strip("│ ").split()) for line in res.output.splitlines()]
    return res.exit_code, next(line for line in lines if "Invalid value" in line)


@pytest.mark.parametrize("flag,value", [("--seed", "abc"), ("--seq-len", "x"), ("--heldout-fraction", "half"),
                                        ("--lr", "fast")])
def test_shared_options_reject_bad_values_alike(flag, value, tmp_path):
    minimal = {"convert": ["p", str(tmp_path / "o")], "train": ["m", "-d", "t", "-o", str(tmp_path / "r")],
               "eval": ["m", "-d", "t"], "demo": [str(tmp_path / "d")]}
    results = {c: _bad_value_message(c, [*minimal[c], flag, value]) for c in COMMANDS if _option(c, flag)}
    assert len(results) >= 2
    assert len(set(results.values())) == 1, results
    code, message = next(iter(results.values()))
    assert code == 2 and f"Invalid value for '{flag}'" in message
    assert not any(tmp_path.iterdir())


def test_shared_dtype_refusal_reads_alike(tmp_path):
    """convert and eval refuse an unknown --dtype with the same words (exit 2, nothing written)."""
    said = {}
    for command, args in (("convert", ["p", str(tmp_path / "o")]), ("eval", ["m", "-d", "t"])):
        res = runner.invoke(app, [command, *args, "--dtype", "int8"])
        assert res.exit_code == 2, res.output
        said[command] = " ".join(res.output.split())
    assert all("unknown --dtype 'int8'; choose one of" in s for s in said.values()), said
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- help in an 80-column terminal

@pytest.mark.parametrize("name", COMMANDS)
def test_help_fits_80_columns_without_breaking_examples(name):
    """Every line of the command's description (examples and their captions included) is rendered whole, and no
    rendered line is wider than the terminal."""
    res = runner.invoke(app, [name, "--help"], env={"COLUMNS": "80"})
    assert res.exit_code == 0
    rendered = res.output.splitlines()
    assert max(len(line) for line in rendered) <= 80
    doc = inspect.cleandoc(_command(name).callback.__doc__)
    summary, _, body = doc.partition("\n\n")
    assert "\n" not in summary  # one line: `upcycle --help` lists it as a flowing paragraph
    examples = [line.strip() for line in body.splitlines() if line.strip()]
    assert any(line.startswith("upcycle ") for line in examples)
    for line in examples:
        assert any(r.strip() == line for r in rendered), f"{line!r} is wrapped at 80 columns"


@pytest.mark.parametrize("name", ["convert", "train", "eval"])
def test_help_groups_options_into_panels(name):
    res = runner.invoke(app, [name, "--help"], env={"COLUMNS": "120"})
    panels = [line.split("─ ")[1].split(" ─")[0] for line in res.output.splitlines() if line.startswith("╭─ ")]
    assert "Common options" in panels and len(panels) >= 5, panels


def test_top_level_help_is_instant():
    """`upcycle --help` imports no torch, transformers or datasets (they take seconds)."""
    import subprocess
    import sys

    code = ("import sys; from upcycle.cli import app; from typer.testing import CliRunner; "
            "CliRunner().invoke(app, ['--help']); CliRunner().invoke(app, ['train', '--help']); "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_path_fields_are_paths(tmp_path):
    assert isinstance(ConvertOptions.from_fields(out=str(tmp_path)).out, Path)
    assert isinstance(TrainConfig(**T).out, Path)
    assert isinstance(EvalOptions(**E, out=str(tmp_path)).out, Path)
