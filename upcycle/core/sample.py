"""The built-in sample text: a fixed piece of real text that exists on every machine, read from this Python's
standard library sources (the training side of upcycle's own split, upcycle.core.assets.stdlib_split).

convert runs the parent over it to fit routers and to rank neurons; eval runs the parent over the same text to rank
the neurons of its equal-cost reference, so both rank on the same text and neither ranks on held-out blocks.
"""

from __future__ import annotations

from pathlib import Path

MAX_TOKENS = 2048  # tokens of the sample the parent reads
BLOCK = 512  # tokens per sequence: the parent's attention runs on blocks, never on one long sequence
DEFAULT_FILES = 8  # standard library files sampled for the default text


def default_files() -> list[Path]:
    """The standard library files the default sample reads. Which files (and their text) depend on this Python's
    version: upcycle.json records them (sample_identity), and --router-init kmeans:TEXT pins a sample instead."""
    from upcycle.core.assets import stdlib_split

    train, _ = stdlib_split()
    step = max(1, len(train) // DEFAULT_FILES)
    return train[::step][:DEFAULT_FILES]


def default_texts() -> list[str]:
    """The first part of each default file."""
    per_file = 4 * MAX_TOKENS * 4 // DEFAULT_FILES  # characters: ~4 per token, with room to spare
    return [f.read_text(errors="replace")[:per_file] for f in default_files()]


def describe_default() -> str:
    return f"{DEFAULT_FILES} standard library sources"
