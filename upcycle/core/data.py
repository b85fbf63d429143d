"""The text-data layer shared by training, evaluation and data-driven router initialisation.

Documents come from local files, folders or glob patterns (plain text, JSON lines / JSON, Parquet, CSV) or, when
online, the "train" split of a hub dataset, all read through `datasets` in streaming mode so that data larger than
memory streams. A plain-text file
(.txt, .md, .rst, .py) is ONE document: source code must not be cut at line boundaries, and the held-out split must
keep whole files apart. A row of a structured file is one document (its `text_field`).

Decisions, in one place:

- Held-out split: a document is held out when a keyed 64-bit BLAKE2b hash of its text (key: the seed) falls below
  `heldout_fraction`. Membership therefore depends on the text and the seed only: not on file order, folder layout,
  world size or shuffling, and exact duplicates always land on the same side (no train/held-out leak through
  copies). "train" and "heldout" partition the non-empty documents of "all".
- Order: with `shuffle`, the files are permuted per epoch, then the document stream is cut into windows of
  `shuffle_buffer` documents, each permuted as a whole. Both permutations come from (seed, epoch, window), so the
  order is a pure function of the arguments. For a stream much longer than the window (one huge .jsonl, a hub
  dataset) this is an approximate shuffle, like any bounded shuffle buffer: rows only mix within a window.
  Windows, not a rolling buffer, because a window can be re-read from its start position: resuming needs a few
  integers instead of a buffer full of documents.
- Packing: each document becomes [bos if the tokenizer adds one] + tokens + [eos]; documents are concatenated and
  cut into blocks of exactly `seq_len` tokens. The tail of an epoch that does not fill a block is dropped.
- Sharding (DDP): every rank reads and tokenises the same global block stream and keeps block `rank` of each round
  of `world_size` consecutive blocks. Ranks are disjoint by construction, and a round that is incomplete at the end
  of an epoch is dropped on every rank, so all ranks take the same number of steps (floor(blocks / world_size)
  per epoch). The price is that each rank tokenises all the data, which is cheap next to a training step.
- Resume: the state is where the next round starts: (epoch, file and row where its window starts, window number,
  document within the window, token within that document). It is the same on every rank and does not depend on the
  world size, so a checkpoint may be resumed with a different number of ranks.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from upcycle.core.errors import InputError, UpcycleError, UsageError
from upcycle.core.paths import datasets_offline, is_hub_id

if TYPE_CHECKING:
    import numpy as np
    import torch

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SUFFIXES = TEXT_SUFFIXES + tuple(TABLE_SUFFIXES)
SPLITS = ("all", "train", "heldout")
_SPLIT_NAMES = {"all": "whole data", "train": "training split", "heldout": "held-out split"}
STATE_FORMAT = "upcycle.core.data/1"
TOKENIZE_BATCH = 64  # documents per tokenizer call: amortises the call, bounds the memory of one batch

_GLOB_CHARS = set("*?[")


# ----------------------------------------------------------------------------------------------------------- files

def _usable(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES and not path.name.startswith(".")


def _walk(folder: Path) -> list[Path]:
    """Usable files under `folder`, recursively, sorted by path; hidden files and folders (.git, ...) skipped."""
    found = []
    for root, dirs, files in os.walk(folder):  # does not follow symlinked folders: no cycles
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(Path(root) / f for f in files if _usable(Path(f)) and (Path(root) / f).is_file())
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def resolve_data_files(paths: Sequence[str | Path]) -> list[str]:
    """Expand files, folders (recursively, sorted) and glob patterns into data files, keeping argument order.

    A string that is not a local path but looks like "owner/name" is a hub dataset name, returned as is when the
    hub is reachable. Duplicates are kept once. Raises InputError for anything that cannot be used.
    """
    return [s.spec for s in _resolve(paths)]


@dataclass(frozen=True)
class _Source:
    spec: str  # a local path or a hub dataset name
    kind: str  # "text", "json", "parquet", "csv" or "hub"


def _file_source(path: Path) -> _Source:
    suffix = path.suffix.lower()
    return _Source(str(path), "text" if suffix in TEXT_SUFFIXES else TABLE_SUFFIXES[suffix])


def _resolve(paths: Sequence[str | Path] | str | Path) -> list[_Source]:
    import glob

    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise InputError("no data given")
    out: list[_Source] = []
    seen: set[str] = set()

    def add(source: _Source) -> None:
        key = source.spec if source.kind == "hub" else str(Path(source.spec).resolve())
        if key not in seen:
            seen.add(key)
            out.append(source)

    for spec in paths:
        text = str(spec)
        p = Path(text).expanduser()
        if p.is_dir():
            files = _walk(p)
            if not files:
                raise InputError(f"{text}: folder holds no usable data files ({', '.join(SUFFIXES)})")
            for f in files:
                add(_file_source(f))
        elif p.is_file():
            if p.suffix.lower() not in SUFFIXES:
                raise InputError(f"{text}: unsupported file type '{p.suffix or '(none)'}'; "
                                 f"use {', '.join(SUFFIXES)}")
            add(_file_source(p))
        elif _GLOB_CHARS & set(text):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True))
            files = [m for m in matches if m.is_file() and _usable(m)]
            if not files:
                raise InputError(f"{text}: pattern matches no usable data files ({', '.join(SUFFIXES)})")
            for f in files:
                add(_file_source(f))
        elif is_hub_id(text):
            if datasets_offline():
                raise InputError(f"{text}: no such file or folder, and it cannot be a hub dataset while "
                                 "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set")
            add(_Source(text, "hub"))
        else:
            raise InputError(f"{text}: no such file or folder")
    return out


def _describe(sources: list[_Source]) -> str:
    first = sources[0].spec
    return first if len(sources) == 1 else f"{first} and {len(sources) - 1} more"


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


# ------------------------------------------------------------------------------------------------------- documents

def _literal(path: str) -> str:
    """`datasets` reads data_files as glob patterns: escape a file name that holds [ ] * or ?."""
    import glob

    return glob.escape(path)


def _stream_texts(sources: list[_Source]) -> Iterator[str]:
    """The contents of plain-text files, one document per file, in order, through one `datasets` stream."""
    from datasets import load_dataset

    # One stream for a whole run of text files: a load_dataset call costs ~10 ms, a run of 2,000 .py files ~1 s.
    # "utf-8-sig" drops a byte-order mark; undecodable bytes (some stdlib test files) become U+FFFD, not a crash.
    ds = load_dataset("text", data_files=[_literal(s.spec) for s in sources], split="train", streaming=True,
                      sample_by="document", encoding="utf-8-sig", encoding_errors="replace")
    n = 0
    for n, row in enumerate(ds, start=1):  # noqa: B007 - n counts the rows after the loop
        yield row["text"]
    if n != len(sources):  # document mode yields exactly one row per file, even an empty one
        raise RuntimeError(f"datasets gave {n} documents for {len(sources)} text files")


def _string_fields(features: Any, row: dict | None) -> list[str]:
    if features is not None:
        return [k for k, v in features.items() if getattr(v, "dtype", None) in ("string", "large_string")]
    return [k for k, v in (row or {}).items() if isinstance(v, str)]


def _stream_table(source: _Source, skip: int, text_field: str | None) -> Iterator[str | None]:
    """The text field of each row of a structured file or hub dataset, from row `skip` on."""
    import logging

    from datasets import load_dataset

    # The JSON builder logs a multi-line error before raising; our own one-line InputError names the file instead.
    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)

    if source.kind == "hub":
        ds = load_dataset(source.spec, split="train", streaming=True)
    else:
        ds = load_dataset(source.kind, data_files=[_literal(source.spec)], split="train", streaming=True)
    features = ds.features
    first = None if features is not None else next(iter(ds), None)
    if features is None and first is None:
        return  # no rows at all
    names = list(features) if features is not None else list(first)
    strings = _string_fields(features, first)
    field = text_field or "text"
    if field not in names or field not in strings:
        have = ", ".join(strings) if strings else "none"
        what = "no" if field not in names else "a non-text"
        hint = "pick one with --text-field" if strings else "this file holds no text column"
        raise InputError(f"{source.spec} has {what} field '{field}' (string fields: {have}); {hint}")
    if skip:
        ds = ds.skip(skip)
    for row in ds.select_columns([field]):
        value = row[field]
        if value is not None and not isinstance(value, str):
            raise InputError(f"{source.spec}: field '{field}' holds {type(value).__name__}, not text")
        yield value


Position = tuple[int, int]  # (index of a source in the epoch's order, row within it)


def _rows(sources: list[_Source], start: Position, text_field: str | None) -> Iterator[tuple[Position, str | None]]:
    """(position after this row, text) for every row from `start` = (source index, row) on, across sources."""
    i, skip = start
    while i < len(sources):
        reading = i  # the source being read, for the error message
        try:
            if sources[i].kind == "text":
                j = i
                while j < len(sources) and sources[j].kind == "text":
                    j += 1
                for n, text in enumerate(_stream_texts(sources[i:j])):
                    reading = min(i + n + 1, j - 1)
                    yield (i + n + 1, 0), text  # a text file is one row: "after it" is the next file
                i = j
            else:
                for row, text in enumerate(_stream_table(sources[i], skip, text_field), start=skip):
                    yield (i, row + 1), text
                i += 1
        except UpcycleError:
            raise
        except Exception as exc:  # a corrupt or unreadable file: one line naming it
            raise InputError(f"cannot read {sources[reading].spec}: {_one_line(exc)}") from exc
        skip = 0


def _heldout(text: str, seed: int, fraction: float) -> bool:
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") < fraction * 2.0**64


def _rng(seed: int, *labels: object) -> random.Random:
    """A generator that depends on (seed, labels) only: not on PYTHONHASHSEED, the platform or the process."""
    digest = hashlib.blake2b(repr((seed,) + labels).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def _check_split(split: str, heldout_fraction: float) -> None:
    if split not in SPLITS:
        raise UsageError(f"split {split!r}: use {', '.join(SPLITS)}")
    if not 0.0 <= heldout_fraction <= 1.0:
        raise UsageError(f"held-out fraction {heldout_fraction:g} must be between 0 and 1")


class _Corpus:
    """The documents of one split: sources, split rule, text field; counts what it saw for error messages."""

    def __init__(self, paths, split: str, heldout_fraction: float, seed: int, text_field: str | None):
        _check_split(split, heldout_fraction)
        self.sources = _resolve(paths)
        self.split, self.fraction, self.seed, self.text_field = split, heldout_fraction, seed, text_field
        self.nonempty = 0
        self.kept = 0

    def order(self, epoch: int, shuffle: bool) -> list[_Source]:
        if not shuffle:
            return self.sources
        order = list(self.sources)
        _rng(self.seed, "files", epoch).shuffle(order)
        return order

    def docs(self, order: list[_Source], start: Position = (0, 0)) -> Iterator[tuple[Position, str]]:
        """(position after, text) of the non-empty documents of the split, from `start` on."""
        for pos, text in _rows(order, start, self.text_field):
            if not text or not text.strip():
                continue
            self.nonempty += 1
            if self.split != "all" and _heldout(text, self.seed, self.fraction) != (self.split == "heldout"):
                continue
            self.kept += 1
            yield pos, text

    def nothing_message(self) -> str:
        where = _describe(self.sources)
        if self.nonempty == 0:
            return f"no text in {where}: every document is empty"
        return (f"the {_SPLIT_NAMES[self.split]} of {where} is empty ({self.nonempty} documents, held-out fraction "
                f"{self.fraction:g}); use split 'all', another held-out fraction or more documents")


def iter_texts(paths, *, split: str = "all", heldout_fraction: float = 0.01, seed: int = 0,
               text_field: str | None = None) -> Iterator[str]:
    """The non-empty documents of `split`, in file order (folders sorted), rows in file order.

    Raises InputError when the split holds no document at all.
    """
    corpus = _Corpus(paths, split, heldout_fraction, seed, text_field)
    for _, text in corpus.docs(corpus.sources):
        yield text
    if corpus.kept == 0:
        raise InputError(corpus.nothing_message())


# -------------------------------------------------------------------------------------------------------- packing

class _Encoder:
    """Batched tokenisation of documents into [bos?] + tokens + [eos] int64 arrays."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        if eos is None:
            raise InputError("the tokenizer has no end-of-text (eos) token to separate documents")
        # Tokenizers that start every sequence with BOS (Llama, Gemma) were trained on documents that start so.
        probe = "Hello world"
        with_special = list(tokenizer(probe)["input_ids"])
        plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
        bos = tokenizer.bos_token_id
        self.prefix = [bos] if bos is not None and with_special[:1] == [bos] and plain[:1] != [bos] else []
        self.suffix = [eos]
        # The Rust tokenizer directly: one parallel call per batch, no "sequence longer than model_max_length"
        # warning for long documents (packing cuts them anyway), no offsets computed.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._fast = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)

    def __call__(self, texts: list[str]) -> list["np.ndarray"]:
        import numpy as np

        if self._fast is not None:
            ids = [e.ids for e in self._fast(texts, add_special_tokens=False)]
        else:
            ids = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [np.asarray(self.prefix + list(x) + self.suffix, dtype=np.int64) for x in ids]


class PackedBlocks:
    """An iterable of LongTensor blocks of `seq_len` tokens, packed from the documents of `split`.

    Iteration goes on from the current position (the start, or what `load_state_dict` set) through `epochs`
    epochs, forever when `epochs` is None; each epoch reshuffles. `state_dict()` is the position after the last
    block yielded, so a run restarted with `load_state_dict(state)` yields exactly the blocks that would have come
    next. Every rank yields the same number of blocks; see the module docstring for how.

    Iterate in the training process itself (no DataLoader worker processes): the state describes what this
    object has yielded, and a worker's copy would run ahead of what the training loop has consumed.
    """

    def __init__(self, tokenizer, paths, *, seq_len: int, split: str = "all", heldout_fraction: float = 0.01,
                 seed: int = 0, text_field: str | None = None, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, shuffle_buffer: int = 1024, epochs: int | None = None):
        if seq_len < 1:
            raise UsageError(f"sequence length {seq_len} must be at least 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} of world size {world_size}: need 0 <= rank < world size")
        if shuffle_buffer < 1:
            raise UsageError(f"shuffle buffer {shuffle_buffer} must be at least 1 document")
        if epochs is not None and epochs < 0:
            raise UsageError(f"epochs {epochs} must not be negative")
        self.corpus = _Corpus(paths, split, heldout_fraction, seed, text_field)
        self.encode = _Encoder(tokenizer)
        self.seq_len, self.seed, self.shuffle = seq_len, seed, shuffle
        self.rank, self.world_size, self.shuffle_buffer, self.epochs = rank, world_size, shuffle_buffer, epochs
        self._identity = self._make_identity(tokenizer)
        self._pos = self._epoch_start(0)
        self.blocks_yielded = 0
        self._tokens = 0  # tokens read in the current epoch, for the too-small message
        self.track_documents = False  # set: last_documents names the documents of the last block yielded
        self.last_documents: list[tuple[str, int]] = []  # (document, tokens it gave the block)

    # -- position

    @staticmethod
    def _epoch_start(epoch: int) -> dict[str, int]:
        return {"epoch": epoch, "source": 0, "row": 0, "window": 0, "doc": 0, "token": 0}

    def _make_identity(self, tokenizer) -> dict[str, Any]:
        """What must not change between saving and loading a position (the world size may)."""
        files = hashlib.blake2b(digest_size=8)
        for s in self.corpus.sources:
            size = Path(s.spec).stat().st_size if s.kind != "hub" else -1
            files.update(f"{Path(s.spec).name}\0{size}\0".encode())
        return {"files": files.hexdigest(), "seq_len": self.seq_len, "split": self.corpus.split,
                "heldout_fraction": self.corpus.fraction, "seed": self.seed, "text_field": self.corpus.text_field,
                "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer,
                "tokenizer": [len(tokenizer), tokenizer.eos_token_id, self.encode.prefix]}

    @property
    def epoch(self) -> int:
        """The epoch that the next block comes from."""
        return self._pos["epoch"]

    def state_dict(self) -> dict:
        """The position after the last block yielded (plain ints and strings: JSON- and torch.save-friendly)."""
        return {"format": STATE_FORMAT, **self._identity, **self._pos, "blocks_yielded": self.blocks_yielded}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position saved by `state_dict()` of the same data, seed and sequence length."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise UsageError("the saved data position is not an upcycle data state; cannot resume from it")
        changed = [k for k, v in self._identity.items() if state.get(k) != v]
        if changed:
            what = ", ".join("the data files" if k == "files" else k for k in changed)
            raise UsageError(f"cannot resume the data position: {what} differ from the checkpoint's")
        self._pos = {k: int(state[k]) for k in self._epoch_start(0)}
        self.blocks_yielded = int(state.get("blocks_yielded", 0))

    # -- iteration

    def _pieces(self, texts: list[str], doc: int, token: int) -> Iterator[tuple[int, int, "np.ndarray"]]:
        """(document index, token offset, tokens from there) for texts[doc:], the first from `token` on."""
        for b in range(doc, len(texts), TOKENIZE_BATCH):
            for k, ids in enumerate(self.encode(texts[b:b + TOKENIZE_BATCH]), start=b):
                start = token if k == doc else 0
                self._tokens += len(ids) - start
                yield k, start, ids[start:]

    def _global_blocks(self, pos: dict[str, int]) -> Iterator[tuple["np.ndarray", dict[str, int]]]:
        """Every block of the epoch from `pos` on, with the position where the block after it starts."""
        import numpy as np

        epoch, window, doc, token = pos["epoch"], pos["window"], pos["doc"], pos["token"]
        start = (pos["source"], pos["row"])
        order = self.corpus.order(epoch, self.shuffle)
        docs = self.corpus.docs(order, start)
        buf: list[np.ndarray] = []
        have = 0
        pieces: list[tuple[str, int]] = []  # with track_documents: the documents of the block being filled
        while True:
            items = list(islice(docs, self.shuffle_buffer))
            if not items:
                return
            perm = list(range(len(items)))
            if self.shuffle:
                _rng(self.seed, "window", epoch, window).shuffle(perm)
            texts = [items[i][1] for i in perm]
            labels = [_document_label(order, items[i][0]) for i in perm] if self.track_documents else None
            for k, offset, ids in self._pieces(texts, doc, token):
                used = 0
                while used < len(ids):
                    take = min(self.seq_len - have, len(ids) - used)
                    buf.append(ids[used:used + take])
                    if labels is not None:
                        pieces.append((labels[k], take))
                    have += take
                    used += take
                    if have == self.seq_len:
                        block = np.concatenate(buf)
                        buf, have = [], 0
                        self.last_documents, pieces = pieces, []
                        yield block, {"epoch": epoch, "source": start[0], "row": start[1], "window": window,
                                      "doc": k, "token": offset + used}
            start, window, doc, token = items[-1][0], window + 1, 0, 0

    def __iter__(self) -> Iterator["torch.LongTensor"]:
        import torch

        while self.epochs is None or self._pos["epoch"] < self.epochs:
            pos = dict(self._pos)
            fresh = pos == self._epoch_start(pos["epoch"])
            self.corpus.nonempty = self.corpus.kept = self._tokens = 0
            rounds = index = 0
            mine = None
            for block, after in self._global_blocks(pos):
                if index == self.rank:
                    mine = block
                index += 1
                if index == self.world_size:  # a complete round: every rank gets its block
                    index, rounds = 0, rounds + 1
                    self._pos = after
                    self.blocks_yielded += 1
                    yield torch.from_numpy(mine)
            if fresh and rounds == 0:
                raise InputError(self._too_small())
            self._pos = self._epoch_start(pos["epoch"] + 1)

    def _too_small(self) -> str:
        if self.corpus.kept == 0:
            return self.corpus.nothing_message()
        need = self.seq_len * self.world_size
        ranks = f" ({self.world_size} ranks need {need})" if self.world_size > 1 else ""
        where = _describe(self.corpus.sources)
        scope = where if self.corpus.split == "all" else f"the {_SPLIT_NAMES[self.corpus.split]} of {where}"
        n = self.corpus.kept
        return (f"data too small for one block of {self.seq_len} tokens{ranks}: {scope} has {n} "
                f"document{'s' if n != 1 else ''} of {self._tokens} tokens in all; "
                "give more text or a smaller sequence length")

    def iter_batches(self, batch_size: int) -> Iterator["torch.LongTensor"]:
        """(batch_size, seq_len) batches of consecutive blocks; an incomplete last batch (finite epochs) is dropped.

        The state after a batch is the state after its last block, so resuming continues at the next batch.
        """
        import torch

        if batch_size < 1:
            raise UsageError(f"batch size {batch_size} must be at least 1")
        batch: list[torch.Tensor] = []
        for block in self:
            batch.append(block)
            if len(batch) == batch_size:
                yield torch.stack(batch)
                batch = []


def heldout_blocks(tokenizer, paths, *, seq_len: int, max_blocks: int, split: str = "heldout",
                   heldout_fraction: float = 0.01, seed: int = 0, text_field: str | None = None) -> "torch.LongTensor":
    """Up to `max_blocks` blocks (n, seq_len) of `split`, the same ones for the same arguments.

    One pass in seeded shuffled order, so that a small sample is spread over the files instead of taken from the
    first ones. Raises InputError when not even one complete block can be formed.
    """
    return heldout_block_documents(tokenizer, paths, seq_len=seq_len, max_blocks=max_blocks, split=split,
                                   heldout_fraction=heldout_fraction, seed=seed, text_field=text_field)[0]


def heldout_block_documents(tokenizer, paths, *, seq_len: int, max_blocks: int, split: str = "heldout",
                            heldout_fraction: float = 0.01, seed: int = 0, text_field: str | None = None
                            ) -> tuple["torch.LongTensor", list[str]]:
    """heldout_blocks, and for each block the document that gave it most of its tokens (block_document)."""
    import torch

    if max_blocks < 1:
        raise UsageError(f"max blocks {max_blocks} must be at least 1")
    blocks = PackedBlocks(tokenizer, paths, seq_len=seq_len, split=split, heldout_fraction=heldout_fraction,
                          seed=seed, text_field=text_field, shuffle=True, epochs=1)
    blocks.track_documents = True
    taken, docs = [], []
    for block in islice(iter(blocks), max_blocks):
        taken.append(block)
        docs.append(block_document(blocks.last_documents))
    return torch.stack(taken), docs


def spread_blocks(tokenizer, paths, *, seq_len: int, max_blocks: int, split: str = "heldout",
                  heldout_fraction: float = 0.01, seed: int = 0, text_field: str | None = None,
                  scan_tokens: int = 2_000_000) -> tuple["torch.LongTensor", list[str]]:
    """Up to `max_blocks` blocks of `split` spread over as many documents as the split offers, with each block's
    document (block_document), the same for the same arguments.

    The blocks of one document are correlated (same file, same topic), so an interval over blocks needs many
    documents behind them (upcycle.evaluate.stats): where heldout_blocks takes the first blocks of a shuffled
    stream (64 blocks of 512 tokens: three to five source files), this reads the same stream, groups its blocks by
    document and takes one block of every document before a second of any, each document's blocks in a seeded
    order (not always its first, which in a source file is the license and imports). It reads until it has seen
    `max_blocks` documents, the split ends, or it has read `scan_tokens` tokens (at least 64 x `max_blocks`
    blocks; a bound for a split of a few huge documents, at about 16 MB of token ids). The chosen blocks keep their
    stream order.
    """
    import torch

    if max_blocks < 1:
        raise UsageError(f"max blocks {max_blocks} must be at least 1")
    stream = PackedBlocks(tokenizer, paths, seq_len=seq_len, split=split, heldout_fraction=heldout_fraction,
                          seed=seed, text_field=text_field, shuffle=True, epochs=1)
    stream.track_documents = True
    seen: list[tuple["torch.LongTensor", str]] = []
    by_doc: dict[str, list[int]] = {}
    for block in stream:
        doc = block_document(stream.last_documents)
        if doc not in by_doc and len(by_doc) == max_blocks:
            break  # the documents seen so far are complete: a new one cannot be chosen
        by_doc.setdefault(doc, []).append(len(seen))
        seen.append((block, doc))
        if len(seen) >= max(64 * max_blocks, scan_tokens // seq_len):
            break
    for doc, idx in by_doc.items():
        _rng(seed, "spread", doc).shuffle(idx)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < max_blocks and any(len(idx) > depth for idx in by_doc.values()):
        for idx in by_doc.values():
            if len(idx) > depth and len(chosen) < max_blocks:
                chosen.append(idx[depth])
        depth += 1
    chosen.sort()
    return torch.stack([seen[i][0] for i in chosen]), [seen[i][1] for i in chosen]


def block_document(pieces: list[tuple[str, int]]) -> str:
    """The document that gave a block most of its tokens (the first of equals): the block's unit for intervals
    over documents (upcycle.evaluate.stats)."""
    best: dict[str, int] = {}
    for doc, n in pieces:
        best[doc] = best.get(doc, 0) + n
    return max(best, key=best.get)


def _document_label(order: list[_Source], after: Position) -> str:
    """A document's name from its position-after in `order` (_rows): the file for a text file, file#row else."""
    i, row = after
    if row == 0:  # a text file: "after it" is the next file
        return order[i - 1].spec
    return f"{order[i].spec}#{row - 1}"
