"""The text-data layer: file resolution, documents, held-out split, packing, shuffling, sharding and resume.

Fixtures are real files written into tmp_path (text, JSON lines, JSON, Parquet, CSV) plus a few real sources of
the Python standard library; the tokenizer is the byte-level one of tests/tiny.py (eos "</s>" = 257).
"""

from __future__ import annotations

import json
import random
import re
import sysconfig
from itertools import islice
from pathlib import Path

import pytest
import torch

from tests.tiny import byte_tokenizer
from upcycle.core.data import PackedBlocks, heldout_blocks, iter_texts, resolve_data_files
from upcycle.core.errors import InputError, UsageError

EOS, BOS = 257, 256
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _doc(rng: random.Random, i: int) -> str:
    return f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of 24 text files (some empty), a 40-row .jsonl, a 15-row .parquet; returns (folder, non-empty docs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(1)
    docs: list[str] = []
    for i in range(24):
        sub = root / ("a" if i % 2 else "b") / ("deep" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        text = "" if i in (5, 11) else ("  \n\n" if i == 17 else _doc(rng, i) + "\n\n" + _doc(rng, 100 + i))
        (sub / f"f{i:02d}.{('txt', 'md', 'py')[i % 3]}").write_text(text)
        if text.strip():
            docs.append(text)
    rows = [{"text": _doc(rng, 200 + i), "id": i, "title": f"t{i}"} for i in range(40)]
    rows[7]["text"] = ""  # an empty row is skipped like an empty file
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs += [r["text"] for r in rows if r["text"]]
    table = [_doc(rng, 300 + i) for i in range(15)]
    pq.write_table(pa.table({"text": table, "n": list(range(15))}), root / "table.parquet")
    docs += table
    (root / "notes.bin").write_bytes(b"\0\1")  # unsupported files inside a folder are ignored
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("never read")
    return root, docs


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _stream(blocks) -> list[int]:
    return [t for b in blocks for t in b.tolist()]


def _complete_docs(tokens: list[int]) -> list[list[int]]:
    """Token lists between two EOS (the first piece may be a document's tail, so it is dropped)."""
    pieces, cur = [], []
    for t in tokens:
        if t == EOS:
            pieces.append(cur)
            cur = []
        else:
            cur.append(t)
    return pieces[1:]


# --------------------------------------------------------------------------------------------------------- files

def test_resolve_folders_recursively_sorted_deduplicated_and_globs(corpus, tmp_path):
    root, _ = corpus
    files = resolve_data_files([root])
    rel = [str(Path(f).relative_to(root)) for f in files]
    assert len(rel) == 24 + 2 and "notes.bin" not in rel and not any(".hidden" in r for r in rel)
    assert rel[:3] == ["a/deep/f03.txt", "a/deep/f09.txt", "a/deep/f15.txt"] and rel[-2:] == ["rows.jsonl", "table.parquet"]
    assert resolve_data_files([root]) == files  # deterministic
    # a file named twice (explicitly and through its folder) is read once, at its first mention
    again = resolve_data_files([root / "rows.jsonl", root])
    assert again[0] == str(root / "rows.jsonl") and len(again) == len(files)
    assert resolve_data_files([f"{root}/**/*.md"]) == [f for f in files if f.endswith(".md")]


def test_resolve_errors_are_one_clear_line(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.bin").write_bytes(b"x")
    (tmp_path / "data").mkdir()
    cases = {
        str(tmp_path / "missing.txt"): "no such file or folder",
        str(tmp_path / "empty"): "no usable data files",
        str(tmp_path / "model.bin"): "unsupported file type '.bin'",
        str(tmp_path / "*.nothing"): "matches no usable data files",
    }
    for spec, message in cases.items():
        with pytest.raises(InputError, match=message) as err:
            resolve_data_files([spec])
        assert "\n" not in str(err.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="cannot be a hub dataset while HF_HUB_OFFLINE"):
        resolve_data_files(["someone/corpus"])
    # online, a hub name is passed through untouched (nothing is fetched here)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert resolve_data_files(["someone/corpus", root / "rows.jsonl"]) == ["someone/corpus", str(root / "rows.jsonl")]
    # ... but a mistyped path under an existing folder is not mistaken for a dataset name
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="no such file or folder"):
        resolve_data_files(["data/train"])


# ----------------------------------------------------------------------------------------------------- documents

def test_documents_files_whole_rows_one_each_empty_skipped(corpus):
    root, docs = corpus
    got = list(iter_texts([root]))
    assert sorted(got) == sorted(docs)  # every non-empty document once: empty files, blank files, empty rows skipped
    # a text file is one document, blank lines and all
    assert any("\n\n" in d for d in got)
    assert got == list(iter_texts(resolve_data_files([root])))  # folders and their expansion read the same


def test_file_names_with_glob_characters_are_read_literally_dangling_links_skipped(tmp_path):
    for name, text in (("a[1].txt", "one"), ("b*c.txt", "two"), ("bxc.txt", "three"), ("r?.jsonl", '{"text": "four"}')):
        (tmp_path / name).write_text(text)
    (tmp_path / "dead.txt").symlink_to(tmp_path / "nowhere.txt")  # a dangling link is not a file: skipped
    assert list(iter_texts([tmp_path])) == ["one", "two", "three", "four"]


def test_split_partitions_documents_by_hash_independent_of_file_order(corpus):
    root, docs = corpus
    files = resolve_data_files([root])
    train = list(iter_texts(files, split="train", heldout_fraction=0.3))
    held = list(iter_texts(files, split="heldout", heldout_fraction=0.3))
    assert set(train).isdisjoint(held) and sorted(train + held) == sorted(docs)
    assert 0.15 < len(held) / len(docs) < 0.45
    # the same documents are held out whatever the order of the files
    assert sorted(iter_texts(files[::-1], split="heldout", heldout_fraction=0.3)) == sorted(held)
    # another seed holds out other documents; fractions 0 and 1 are the edges
    assert set(iter_texts(files, split="heldout", heldout_fraction=0.3, seed=1)) != set(held)
    assert sorted(iter_texts(files, split="train", heldout_fraction=0.0)) == sorted(docs)
    with pytest.raises(InputError, match="held-out split of .* is empty"):
        list(iter_texts(files, split="heldout", heldout_fraction=0.0))
    with pytest.raises(UsageError, match="split 'test'"):
        list(iter_texts(files, split="test"))
    with pytest.raises(UsageError, match="between 0 and 1"):
        list(iter_texts(files, split="train", heldout_fraction=1.5))


def test_text_field_selection_and_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": i, "body": f"body {i}", "title": f"title {i}", "score": 0.5} for i in range(4)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert list(iter_texts([tmp_path / "a.jsonl"], text_field="body")) == [f"body {i}" for i in range(4)]
    with pytest.raises(InputError, match=r"a.jsonl has no field 'text' \(string fields: body, title\); pick one with --text-field"):
        list(iter_texts([tmp_path / "a.jsonl"]))
    with pytest.raises(InputError, match=r"has a non-text field 'id' \(string fields: body, title\)"):
        list(iter_texts([tmp_path / "a.jsonl"], text_field="id"))
    # a JSON array, a Parquet table and a CSV file with a chosen field
    (tmp_path / "b.json").write_text(json.dumps([{"content": "x y"}, {"content": "z"}]))
    pq.write_table(pa.table({"content": ["p1", "p2"]}), tmp_path / "c.parquet")
    (tmp_path / "d.csv").write_text("content,n\nc1,1\nc2,2\n")
    got = list(iter_texts([tmp_path / "b.json", tmp_path / "c.parquet", tmp_path / "d.csv"], text_field="content"))
    assert got == ["x y", "z", "p1", "p2", "c1", "c2"]
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file at all")
    with pytest.raises(InputError, match="cannot read .*bad.parquet"):
        list(iter_texts([tmp_path / "bad.parquet"]))


def test_corrupt_jsonl_is_one_line_naming_the_file(tmp_path, capfd):
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": oops\n')
    with pytest.raises(InputError, match=r"^cannot read .*broken.jsonl: ArrowInvalid: JSON parse error") as err:
        list(iter_texts([tmp_path / "broken.jsonl"]))
    assert "\n" not in str(err.value)
    assert "Failed to load JSON" not in capfd.readouterr().err  # no second, multi-line report from datasets


def test_hub_dataset_name_when_online(tmp_path, tok, monkeypatch):
    """A hub name is read with load_dataset(name, split="train", streaming=True); here it is served locally."""
    import datasets

    rows = [{"text": f"hub row {i} " + "x" * (i % 7), "lang": "en"} for i in range(30)]
    (tmp_path / "hub.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    real = datasets.load_dataset
    calls = []

    def fake(name, *args, **kwargs):
        if name == "someone/corpus":
            calls.append(kwargs)
            return real("json", data_files=[str(tmp_path / "hub.jsonl")], split="train", streaming=True)
        return real(name, *args, **kwargs)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert list(iter_texts(["someone/corpus"])) == [r["text"] for r in rows]
    assert calls[0] == {"split": "train", "streaming": True}
    kw = dict(seq_len=8, seed=2, shuffle_buffer=4, epochs=1)
    full = list(PackedBlocks(tok, ["someone/corpus"], **kw))
    first = PackedBlocks(tok, ["someone/corpus"], **kw)
    head = list(islice(iter(first), 11))
    again = PackedBlocks(tok, ["someone/corpus"], **kw)
    again.load_state_dict(first.state_dict())
    assert _stream(head + list(again)) == _stream(full)  # resume skips rows of the stream exactly


# ------------------------------------------------------------------------------------------------------- packing

def test_packing_is_documents_with_eos_between_cut_into_full_blocks(corpus, tok):
    root, _ = corpus
    files = resolve_data_files([root])
    blocks = list(PackedBlocks(tok, files, seq_len=32, shuffle=False, epochs=1))
    expected = [t for d in iter_texts(files) for t in _ids(tok, d) + [EOS]]
    assert all(b.dtype == torch.long and b.shape == (32,) for b in blocks)
    assert len(blocks) == len(expected) // 32 and _stream(blocks) == expected[: len(blocks) * 32]


def test_bos_is_prepended_when_the_tokenizer_adds_one(tmp_path):
    from tokenizers import processors

    bos_tok = byte_tokenizer()
    bos_tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    assert bos_tok("ab")["input_ids"] == [BOS, 64, 65]
    (tmp_path / "x.txt").write_text("ab")
    (tmp_path / "y.txt").write_text("cd")
    blocks = heldout_blocks(bos_tok, [tmp_path], seq_len=4, max_blocks=9, split="all")
    assert sorted(blocks.tolist()) == [[BOS, 64, 65, EOS], [BOS, 66, 67, EOS]]


def test_order_is_deterministic_from_seed_and_a_permutation_of_documents(corpus, tok):
    root, _ = corpus

    def run(**kw):
        return list(PackedBlocks(tok, [root], seq_len=32, epochs=1, **kw))

    a, b, c, plain = run(seed=0), run(seed=0), run(seed=1), run(shuffle=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert _stream(a) != _stream(c) and _stream(a) != _stream(plain)
    assert len(a) == len(c) == len(plain)  # same tokens in all, so the same number of full blocks
    # shuffling reorders whole documents; it never cuts or merges them
    docs = {tuple(_ids(tok, d)) for d in iter_texts([root])}
    for run_ in (a, c):
        pieces = _complete_docs(_stream(run_))
        assert len(pieces) > 60 and all(tuple(p) in docs for p in pieces)
    # small windows still shuffle across files (file order) and within windows
    small = run(seed=0, shuffle_buffer=4)
    assert _stream(small) != _stream(plain) and _stream(small) != _stream(a)
    # a window of one document leaves only the file shuffle: files move, rows of one file stay in order
    order = [tok.decode(p) for p in _complete_docs(_stream(run(seed=0, shuffle_buffer=1)))]
    natural = list(iter_texts([root]))
    rows = [d for d in order if re.match(r"doc 2\d\d:", d)]  # the .jsonl rows are "doc 200" to "doc 239"
    assert order != [d for d in natural if d in order] and len(rows) > 30
    assert rows == [d for d in natural if d in rows]


def test_epochs_reshuffle_with_the_same_number_of_blocks(corpus, tok):
    root, _ = corpus
    blocks = PackedBlocks(tok, [root], seq_len=32, epochs=2)
    seen = list(blocks)
    n = len(list(PackedBlocks(tok, [root], seq_len=32, epochs=1)))
    assert len(seen) == 2 * n and _stream(seen[:n]) != _stream(seen[n:])
    assert blocks.epoch == 2 and list(blocks) == []  # finished: iterating again yields nothing


@pytest.mark.parametrize("buffer", [5, 1024])
def test_resume_from_state_dict_continues_exactly(corpus, tok, buffer):
    root, _ = corpus
    kw = dict(seq_len=16, seed=3, shuffle_buffer=buffer, epochs=2)
    full = list(PackedBlocks(tok, [root], **kw))
    per_epoch = len(full) // 2
    for cut in (1, 7, per_epoch // 3, per_epoch // 2, 2 * per_epoch // 3, per_epoch - 1, per_epoch, per_epoch + 13):
        first = PackedBlocks(tok, [root], **kw)
        it = iter(first)
        head = [next(it) for _ in range(cut)]
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
        assert state["blocks_yielded"] == cut
        again = PackedBlocks(tok, [root], **kw)
        again.load_state_dict(state)
        rest = list(again)
        assert _stream(head + rest) == _stream(full), cut
    # resumed again and again, every 3 blocks: the positions saved after a resume are exact too
    chain, state = [], None
    for step in range(15):
        part = PackedBlocks(tok, [root], **kw)
        if state is not None:
            part.load_state_dict(state)
        chain += list(islice(iter(part), 3 if step < 14 else None))
        state = part.state_dict()
    assert _stream(chain) == _stream(full)


def test_resume_refuses_another_data_setup(corpus, tok, tmp_path):
    root, _ = corpus
    first = PackedBlocks(tok, [root], seq_len=16)
    next(iter(first))
    state = first.state_dict()
    with pytest.raises(UsageError, match="seq_len differ"):
        PackedBlocks(tok, [root], seq_len=32).load_state_dict(state)
    with pytest.raises(UsageError, match="the data files differ"):
        PackedBlocks(tok, [root / "a"], seq_len=16).load_state_dict(state)
    with pytest.raises(UsageError, match="not an upcycle data state"):
        PackedBlocks(tok, [root], seq_len=16).load_state_dict({"epoch": 0})


def test_ranks_get_disjoint_blocks_and_the_same_number_of_steps(corpus, tok):
    root, _ = corpus
    kw = dict(seq_len=16, seed=5, epochs=1)
    glob = list(PackedBlocks(tok, [root], **kw))
    ws = next(w for w in (3, 4, 5, 7) if len(glob) % w)  # a last round that is incomplete
    ranks = [list(PackedBlocks(tok, [root], rank=r, world_size=ws, **kw)) for r in range(ws)]
    for r, mine in enumerate(ranks):
        assert len(mine) == len(glob) // ws  # the incomplete last round is dropped on every rank
        assert all(torch.equal(b, glob[ws * i + r]) for i, b in enumerate(mine))  # round robin: disjoint positions
    # the state is global: resuming with another world size continues the same global stream
    one = PackedBlocks(tok, [root], **kw)
    it = iter(one)
    for _ in range(10):
        next(it)
    two = [PackedBlocks(tok, [root], rank=r, world_size=2, **kw) for r in range(2)]
    for b in two:
        b.load_state_dict(one.state_dict())
    r0, r1 = list(two[0]), list(two[1])
    assert len(r0) == len(r1) == (len(glob) - 10) // 2
    assert all(torch.equal(x, glob[10 + 2 * i]) and torch.equal(y, glob[11 + 2 * i]) for i, (x, y) in enumerate(zip(r0, r1)))
    with pytest.raises(UsageError, match="rank 2 of world size 2"):
        PackedBlocks(tok, [root], seq_len=16, rank=2, world_size=2)


def test_batches_stack_blocks_and_resume_at_the_next_batch(corpus, tok):
    root, _ = corpus
    blocks = list(PackedBlocks(tok, [root], seq_len=16, epochs=1))
    data = PackedBlocks(tok, [root], seq_len=16, epochs=1)
    it = data.iter_batches(4)
    first = next(it)
    assert first.shape == (4, 16) and torch.equal(first, torch.stack(blocks[:4]))
    again = PackedBlocks(tok, [root], seq_len=16, epochs=1)
    again.load_state_dict(data.state_dict())
    batches = list(again.iter_batches(4))
    assert len(batches) == (len(blocks) - 4) // 4 and torch.equal(batches[0], torch.stack(blocks[4:8]))


# ------------------------------------------------------------------------------------------------ held-out blocks

def test_heldout_blocks_are_deterministic_and_come_from_heldout_documents(corpus, tok):
    root, _ = corpus
    kw = dict(seq_len=16, max_blocks=40, heldout_fraction=0.3)
    a = heldout_blocks(tok, [root], **kw)
    assert a.shape == (40, 16) and a.dtype == torch.long
    assert torch.equal(a, heldout_blocks(tok, [root], **kw))  # parent and MoE get the same tokens
    assert not torch.equal(a, heldout_blocks(tok, [root], seed=1, **kw))
    held = [_ids(tok, d) + [EOS] for d in iter_texts([root], split="heldout", heldout_fraction=0.3)]
    train = [_ids(tok, d) + [EOS] for d in iter_texts([root], split="train", heldout_fraction=0.3)]
    for p in _complete_docs(_stream(a)):
        doc = p + [EOS]
        assert doc in held and doc not in train
    assert len(_complete_docs(_stream(a))) >= 3
    # fewer blocks than asked when the split is small; the whole split when max_blocks is large
    everything = heldout_blocks(tok, [root], seq_len=16, max_blocks=10_000, heldout_fraction=0.3)
    assert everything.shape[0] == sum(len(d) for d in held) // 16


def test_too_little_or_no_text_is_a_clear_error(tmp_path, tok):
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(InputError, match=r"data too small for one block of 64 tokens: .*short.txt has 1 document of 5 tokens in all"):
        heldout_blocks(tok, [tmp_path / "short.txt"], seq_len=64, max_blocks=4, split="all")
    with pytest.raises(InputError, match=r"2 ranks need 8"):
        list(PackedBlocks(tok, [tmp_path / "short.txt"], seq_len=4, world_size=2))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "a.txt").write_text("")
    (tmp_path / "e" / "b.md").write_text(" \n")
    (tmp_path / "e" / "c.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    for call in (lambda: heldout_blocks(tok, [tmp_path / "e"], seq_len=4, max_blocks=1, split="all"),
                 lambda: next(iter(PackedBlocks(tok, [tmp_path / "e"], seq_len=4))),
                 lambda: list(iter_texts([tmp_path / "e"]))):
        with pytest.raises(InputError, match="every document is empty"):
            call()


def test_python_standard_library_sources(tok):
    """The project's demo corpus: real .py files, each one document, through the whole pipeline."""
    std = Path(sysconfig.get_paths()["stdlib"])
    files = [std / "textwrap.py", std / "shlex.py", std / "json"]
    resolved = resolve_data_files(files)
    assert resolved[:2] == [str(std / "textwrap.py"), str(std / "shlex.py")]
    assert resolved[2:] == sorted(str(p) for p in (std / "json").rglob("*.py") if "__pycache__" not in p.parts)
    texts = list(iter_texts(files))
    assert texts == [Path(f).read_text(encoding="utf-8") for f in resolved]
    blocks = list(PackedBlocks(tok, files, seq_len=256, shuffle=False, epochs=1))
    expected = [t for d in texts for t in _ids(tok, d) + [EOS]]
    assert _stream(blocks) == expected[: len(blocks) * 256] and len(blocks) == len(expected) // 256
    # the split keeps whole files apart
    held = list(iter_texts(files, split="heldout", heldout_fraction=0.5))
    train = list(iter_texts(files, split="train", heldout_fraction=0.5))
    assert held and train and sorted(held + train) == sorted(texts)
