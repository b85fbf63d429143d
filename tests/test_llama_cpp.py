"""llama.cpp itself as the judge: the MoE files this tool writes compute the parent's function in llama.cpp.

llama.cpp is built on CPU from the llama-cpp-python sdist on PyPI (pinned; benchmarks/llama_cpp.py), cached outside
the repository: a cold build takes 4 to 20 minutes on 2 cores, by CPU; later runs reuse it. The text is Debian's GPL-3
(Python's LICENSE.txt where that file is missing): nobody here wrote it.

The bound. llama.cpp does not compute a model bit-reproducibly across batch shapes: running the very same dense
file with another micro-batch size (-ub 7, 16, 64) moves its logits, because the kernels and summation order
change and, for quantized weights, every activation is re-quantized to 8 bits before each product, which turns
last-bit changes into visible ones (measured on SmolLM2 Q4_1: 2-3% of the largest logit; f32: about 5e-4). The MoE's
differences from its dense parent are of the same kind (two expert outputs weighted w and 1 - w instead of one
output; a different matrix-product kernel for experts). So the MoE passes when it is as close to the parent as the
parent is to itself: per prompt, its max relative logit difference is at most the parent's own under the
micro-batch changes, times 1.5 (a margin for other CPUs, where both numbers move); over 1024 positions its mean KL
divergence is at most 1.5 times the parent's own under -ub 7. A negative control (the fine-grained MoE without its
per-expert scale) must fail both by far. Greedy text (16 tokens after each of 4 prompts) must be the parent's, or
part from it only at a near tie: where the two continuations part, the parent's own logit for its next token may
lead the MoE's next token by no more than the largest change llama.cpp's noise makes to one logit (about 0.5-0.9
for SmolLM2 Q4_1); such ties exist in real text, and the parent under another micro-batch size flips at them too
(on one AMD EPYC the parent Q4_1 changed its own text after 1 of the 4 prompts under -ub 7, 16 and 64, and the MoE
parted from it after 3, each time where the parent's own margin was under that noise). How many prompts keep the
same text is therefore reported, not required.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import CI
from upcycle.cli import app

pytestmark = pytest.mark.slow
gguf = pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_gguf  # noqa: E402
import llama_cpp  # noqa: E402

MARGIN = 1.5


@pytest.fixture(scope="module")
def llama():
    try:
        return llama_cpp.build()
    except (SystemExit, OSError) as exc:  # no cmake/ninja, no network to PyPI and nothing cached
        if CI:
            pytest.fail(f"CI=true needs llama.cpp: {exc}")
        pytest.skip(f"llama.cpp could not be built: {exc}")


@pytest.fixture(scope="module")
def text():
    path, _ = bench_gguf.real_text()
    return path, bench_gguf.prompts(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One folder for the module, emptied at its end: the GGUFs here are hundreds of MB to GB each, and a CI disk
    is not assumed to hold them all (each test also deletes its own outputs when it is done with them)."""
    path = tmp_path_factory.mktemp("llama-cpp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def dense_of(llama, text, work):
    """dense_of(file) -> its measurements (logits, noise, greedy text, KLD noise), made once per file."""
    cache: dict = {}

    def get(path: Path) -> bench_gguf.Dense:
        if path not in cache:
            cache[path] = bench_gguf.Dense(path, text[1], text[0], work, threads=2)
        return cache[path]

    return get


@pytest.fixture(scope="module")
def dense_q4(dense_of, smollm2_gguf):
    return dense_of(smollm2_gguf)


def convert(*args):
    res = CliRunner().invoke(app, ["convert", *map(str, args)])
    assert res.exit_code == 0, res.output
    return res


def assert_parent_function(r: dict, what: str) -> None:
    for i, (d, n) in enumerate(zip(r["logits_max_rel_diff"], r["noise_max_rel_diff"])):
        assert d <= MARGIN * n, f"{what}, prompt {i}: logits differ by {d:.3g} of the largest, the parent's own " \
                                f"noise is {n:.3g}"
    k, noise = r["kld"], r["kld_noise"]
    assert k["mean_kld"] <= MARGIN * noise["mean_kld"], f"{what}: mean KLD {k['mean_kld']} vs noise {noise['mean_kld']}"
    for same, tie, g in zip(r["greedy_same"], r["divergence_margin"], r["greedy"]):
        assert same or tie["margin"] <= r["noise_abs"], \
            f"{what}: greedy text parts at a margin of {tie['margin']:.3g} > noise {r['noise_abs']:.3g}: {g}"


def test_q4_1_moe_is_the_q4_1_parent_in_llama_cpp(smollm2_gguf, dense_q4, work):
    """The README's command: the parent's Q4_1 blocks in 8 experts, top-2, default (k-means) router."""
    out = work / "moe8.gguf"
    convert(smollm2_gguf, out, "--experts", 8, "--top-k", 2)
    r = dense_q4.compare(out)
    out.unlink()
    assert_parent_function(r, "8 x top-2 Q4_1")
    assert abs(r["kld"]["ppl_model"] - r["kld"]["ppl_base"]) <= 2 * MARGIN * abs(
        r["kld_noise"]["ppl_model"] - r["kld_noise"]["ppl_base"]) + 1e-3


def test_fine_grained_q4_1_moe_needs_and_gets_its_scale(smollm2_gguf, dense_q4, work):
    """16 x top-4 half-width experts: exact through llama.cpp's per-expert scale; without it, far off."""
    out = work / "moe16.gguf"
    convert(smollm2_gguf, out, "-e", 16, "-k", 4, "-g", 2, "--router-init", "random")
    assert_parent_function(dense_q4.compare(out), "16 x top-4 G=2 Q4_1")
    bad = work / "moe16-no-scale.gguf"
    shutil.move(out, bad)
    bench_gguf.drop_scales(bad)
    r = dense_q4.compare(bad)
    bad.unlink()
    assert min(r["logits_max_rel_diff"]) > 5 * max(r["noise_max_rel_diff"])
    assert r["kld"]["mean_kld"] > 20 * r["kld_noise"]["mean_kld"]
    assert not r["greedy_same_or_tie"]


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0"])
def test_retyped_moe_is_the_retyped_parent(dense_of, smollm2_gguf, work, gguf_type):
    from upcycle.convert.gguf_out import retype_dense

    dense = dense_of(retype_dense(smollm2_gguf, work / f"dense-{gguf_type}.gguf", gguf_type))
    out = work / f"moe-{gguf_type}.gguf"
    convert(smollm2_gguf, out, "-e", 8, "-k", 2, "--router-init", "random", "--gguf-type", gguf_type)
    try:
        assert_parent_function(dense.compare(out), f"8 x top-2 {gguf_type}")
    finally:
        out.unlink()
        dense.path.unlink()


def parent_through_converter(dense_of, smollm2_gguf, work) -> bench_gguf.Dense:
    """The parent as a float32 folder through the same converter (the folder is deleted once converted)."""
    from upcycle.core.loading import export_dense

    dense_file = work / "parent-hf.gguf"
    if not dense_file.exists():
        folder = export_dense(smollm2_gguf, work / "parent-hf", dtype="float32")
        llama_cpp.convert_hf(folder, dense_file)
        shutil.rmtree(folder)
    return dense_of(dense_file)


@pytest.mark.parametrize("extra", [
    ("-e", 4, "-k", 2),
    ("-e", 8, "-k", 4, "-g", 2),
    ("--format", "granitemoe", "-e", 4, "-k", 2),
    ("--format", "granitemoeshared", "-e", 3, "-k", 2, "--shared-experts", 1),
], ids=["mixtral-4x2", "mixtral-8x4-g2", "granitemoe-4x2", "granitemoeshared-3x2-s1"])
def test_folder_through_llama_cpps_converter(dense_of, smollm2_gguf, work, extra):
    """Users who write a folder and convert it with llama.cpp's own convert_hf_to_gguf.py are covered too: every
    folder type of a llama parent that llama.cpp's converter and loader take computes the parent's function there."""
    dense = parent_through_converter(dense_of, smollm2_gguf, work)
    folder = work / "moe-hf"
    shutil.rmtree(folder, ignore_errors=True)
    convert(smollm2_gguf, folder, *extra, "--router-init", "random", "--no-verify")
    try:
        moe = llama_cpp.convert_hf(folder, work / "moe-hf.gguf")
    finally:
        shutil.rmtree(folder)
    try:
        assert_parent_function(dense.compare(moe), f"folder {extra} via convert_hf_to_gguf.py")
    finally:
        moe.unlink()


@pytest.mark.parametrize("extra, error", [
    (("--format", "glm4_moe", "-e", 4, "-k", 2), "gMASK"),
    (("--format", "granitemoeshared", "-e", 4, "-k", 2), "not enough values to unpack"),
], ids=["glm4_moe", "granitemoeshared-no-shared"])
def test_folders_llama_cpps_converter_refuses(llama, smollm2_gguf, work, extra, error):
    """What docs/compatibility.md says of these: transformers loads them, llama.cpp's converter does not (glm4_moe:
    it expects GLM's own tokenizer; granitemoeshared: it needs a shared expert)."""
    folder = work / "refused"
    shutil.rmtree(folder, ignore_errors=True)
    # bfloat16 halves the disk: these refusals are about the tokenizer and the tensor layout, not the dtype
    convert(smollm2_gguf, folder, *extra, "--dtype", "bfloat16", "--router-init", "random", "--no-verify")
    with pytest.raises(RuntimeError, match=error):
        llama_cpp.convert_hf(folder, work / "refused.gguf")
    shutil.rmtree(folder)


def test_qwen2_moe_folder_converts_but_llama_cpp_refuses_it(llama, smollm2_gguf, text, work):
    """What docs/compatibility.md says of qwen2_moe: llama.cpp's converter takes the folder, its loader does not
    (qwen2moe wants an untied output.weight and a shared expert); .gguf output refuses qwen2_moe with that reason."""
    folder = work / "qwen"
    convert(smollm2_gguf, folder, "--format", "qwen2_moe", "-e", 4, "-k", 2, "--routing", "softmax",
            "--router-std", 0, "--no-verify")
    converted = llama_cpp.convert_hf(folder, work / "qwen.gguf")
    shutil.rmtree(folder)
    with pytest.raises(RuntimeError, match="output.weight|shexp"):
        llama_cpp.last_logits(converted, text[1][0], work=work)
    converted.unlink()
