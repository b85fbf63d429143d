"""The one place for hub ids, offline mode, output folders and layer selections (upcycle.core.paths, .layers)."""

from __future__ import annotations

import pytest

from upcycle.core.errors import OutputError, UsageError
from upcycle.core.layers import format_ranges, parse_layers
from upcycle.core.paths import check_output_folder, datasets_offline, hub_offline, is_hub_id


@pytest.mark.parametrize("spec, hub", [
    ("HuggingFaceTB/SmolLM2-135M", True),
    ("Qwen/Qwen2.5-0.5B", True),          # a dot in the name is not a file type
    ("someone/corpus", True),
    ("gpt2", False),                      # a single name is not taken for a hub id
    ("a/b/c", False),
    ("./local", False), ("~/model", False), ("/abs/path", False),
    ("someone/", False), ("/x", False),   # used to count as hub ids for models (an empty part)
    ("some one/x", False), ("a/b:c", False), ("a/b*", False),
    ("a--b/c", False), ("a/b..c", False), ("a/b.git", False), ("-a/b", False),
    ("x/train.jsonl", False),             # used to count as a hub id for models: a file name, not a repository
    ("x/model.gguf", False), ("x/weights.safetensors", False),
])
def test_hub_id_rule(spec, hub):
    assert is_hub_id(spec) is hub


def test_hub_id_an_existing_folder_makes_it_a_mistyped_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("models/tiny")
    (tmp_path / "models").mkdir()
    # used to be a hub id for models (a download attempt and a hub error) and a local path for data
    assert not is_hub_id("models/tiny")
    (tmp_path / "models" / "tiny").mkdir()
    assert not is_hub_id("models/tiny")


@pytest.mark.parametrize("env, hub, data", [
    ({}, False, False),
    ({"HF_HUB_OFFLINE": "1"}, True, True),
    ({"HF_HUB_OFFLINE": "TRUE"}, True, True),
    ({"HF_HUB_OFFLINE": "on"}, True, True),
    ({"HF_HUB_OFFLINE": "false"}, False, False),   # convert used to read any value but 0 as offline
    ({"HF_HUB_OFFLINE": "off"}, False, False),
    ({"HF_HUB_OFFLINE": "0"}, False, False),
    ({"TRANSFORMERS_OFFLINE": "1"}, True, True),   # huggingface_hub honours it; neither old rule did
    ({"HF_DATASETS_OFFLINE": "1"}, False, True),   # datasets only: models can still be fetched
    ({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "0"}, True, False),  # datasets' own variable wins for data
])
def test_offline_rules_follow_the_fetching_libraries(env, hub, data, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert (hub_offline(), datasets_offline()) == (hub, data)


def test_output_folder_rules(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_folder(tmp_path / "file")
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("x")
    with pytest.raises(OutputError, match="full is not empty; pass --overwrite"):
        check_output_folder(full)
    check_output_folder(full, overwrite=True)
    # a command that adds files only minds its own
    check_output_folder(full, option="--out", conflicts=lambda d: [n for n in ("report.md",) if (d / n).exists()])
    (full / "report.md").write_text("x")
    with pytest.raises(OutputError, match=r"--out .*full is not empty \(report.md\); again"):
        check_output_folder(full, option="--out", conflicts=lambda d: [n for n in ("report.md",) if (d / n).exists()],
                            fix="again")
    # missing parents are created by commands that can, refused by convert (parents=False)
    check_output_folder(tmp_path / "a" / "b" / "c")
    with pytest.raises(OutputError, match="does not exist"):
        check_output_folder(tmp_path / "a" / "b" / "c", parents=False)
    with pytest.raises(OutputError, match="is a file"):
        check_output_folder(tmp_path / "file" / "sub")


def test_output_folder_unwritable_parent(tmp_path, monkeypatch):
    import upcycle.core.paths as paths

    # stands in for a read-only folder (chmod does not stop root, and tests may run as root)
    monkeypatch.setattr(paths.os, "access", lambda path, mode: False)
    with pytest.raises(OutputError, match="is not writable"):
        check_output_folder(tmp_path / "out")
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(OutputError, match="is not writable"):  # replaced whole: renamed into the parent
        check_output_folder(existing)
    check_output_folder(existing, conflicts=lambda d: [])  # files are only added inside it


def test_format_ranges():
    assert format_ranges([]) == ""
    assert format_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert format_ranges([3]) == "3"


def test_parse_layers_convert_grammar():
    p = lambda s: parse_layers(s, 8, option="--moe-layers")  # noqa: E731
    assert p("all") == list(range(8))
    assert p(" ALL ") == list(range(8))
    assert p("every:2") == [1, 3, 5, 7]
    assert p("0,2,4-6") == [0, 2, 4, 5, 6]
    assert p("-1") == [7]
    assert p("-2--1") == [6, 7]
    assert p("1,,2,") == [1, 2]
    for spec, msg in [("every:0", "every:N needs N >= 1"), ("x", "use all, every:N, or a list like 0,2,4-7"),
                      ("auto", "use all, every:N, or a list"), ("0,8", "layer 8 is outside 0..7"),
                      ("-9", "outside 0..7"), ("5-3", "outside 0..7"), ("", "selects no layer"),
                      ("every:9", "selects no layer")]:
        with pytest.raises(UsageError, match=msg):
            p(spec)


def test_parse_layers_eval_grammar():
    moe = [1, 2, 3, 5]
    p = lambda s: parse_layers(s, 6, option="--layers", words=("auto", "all", "none", "every:N"),  # noqa: E731
                               candidates=moe)
    assert p("auto") == [1, 3, 5]
    assert p("all") == moe
    assert p("none") == [] and p("") == []
    assert p("1-3") == [1, 2, 3]
    assert p("every:2") == [1, 3, 5]
    assert p("-1") == [5]
    with pytest.raises(UsageError, match=r"\[0, 4\] are not MoE layers of this model \(MoE layers: 1-3,5\)"):
        p("0-4")
    with pytest.raises(UsageError, match="empty range"):
        p("3-1")
    with pytest.raises(UsageError, match="use auto, all, none, every:N, or a list like 0,2,4-7"):
        p("first")
