"""`upcycle convert PARENT OUT.gguf`: the real Q4_1 SmolLM2 parent into llama.cpp's MoE, its blocks kept.

These tests read the written file back with gguf's own reader and compare it with the parent independently of
the writer (bytes, dequantized values); that llama.cpp computes the parent's function from it is
tests/test_llama_cpp.py (slow: it builds llama.cpp).
"""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.tiny import assert_same_logits, one_line
from upcycle.cli import app

gguf = pytest.importorskip("gguf")
runner = CliRunner()


def convert(*args):
    result = runner.invoke(app, ["convert", *map(str, args)])
    assert "Traceback" not in result.output
    return result


def tensors(path):
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def raw(t) -> np.ndarray:
    return np.asarray(t.data).reshape(-1).view(np.uint8)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def moe8(smollm2_gguf, tmp_path_factory):
    """The README's command, with the default (k-means) router: its parent pass runs on the GGUF parent too."""
    out = tmp_path_factory.mktemp("gguf") / "moe8.gguf"
    r = convert(smollm2_gguf, out, "--experts", 8, "--top-k", 2)
    assert r.exit_code == 0, r.output
    return out, one_line(r.output)


def test_q4_1_parent_to_8_experts_keeps_every_block(smollm2_gguf, moe8):
    out, output = moe8
    assert "every expert equal to its parent neurons" in output and "90 x Q4_1" in output
    reader = gguf.GGUFReader(str(out))
    parent = gguf.GGUFReader(str(smollm2_gguf))
    f = reader.fields
    assert f["general.architecture"].contents() == "llama"
    assert f["llama.expert_count"].contents() == 8 and f["llama.expert_used_count"].contents() == 2
    assert f["llama.feed_forward_length"].contents() == 1536
    # the tokenizer and every other setting are the parent's
    for key, field in parent.fields.items():
        if key.startswith(("tokenizer.", "llama.rope", "llama.attention", "general.file_type")):
            assert f[key].contents() == field.contents(), key
    got, ref = tensors(out), {t.name: t for t in parent.tensors}
    for name, t in ref.items():
        if ".ffn_gate." in name or ".ffn_up." in name or ".ffn_down." in name:
            assert name not in got
            continue
        assert got[name].tensor_type == t.tensor_type and np.array_equal(raw(got[name]), raw(t)), name
    for i in (0, 17, 29):
        assert got[f"blk.{i}.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
        assert f"blk.{i}.ffn_down_exps.scale" not in got  # whole copies need no scale
        for w in ("gate", "up", "down"):
            exps, dense = got[f"blk.{i}.ffn_{w}_exps.weight"], ref[f"blk.{i}.ffn_{w}.weight"]
            assert exps.tensor_type == gguf.GGMLQuantizationType.Q4_1
            per = raw(exps).reshape(8, -1)
            for e in range(8):  # each expert is the parent's Q4_1 tensor, byte for byte
                assert np.array_equal(per[e], raw(dense)), (i, w, e)
    assert leftovers(out.parent) == ["moe8.gguf"]


def test_fine_grained_slices_whole_blocks_and_scales_by_llama_cpp(smollm2_gguf, tmp_path):
    """16 x top-4 of half-width experts: gate/up take rows, down takes whole Q4_1 blocks (768 = 24 x 32 values) of
    each row; the group factor 2 is llama.cpp's per-expert output scale, not a change to the blocks."""
    out = tmp_path / "fine.gguf"
    r = convert(smollm2_gguf, out, "-e", 16, "-k", 4, "-g", 2, "--router-init", "random", "--no-verify")
    assert r.exit_code == 0, r.output
    got, ref = tensors(out), tensors(smollm2_gguf)
    bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_1]
    for i in (0, 29):
        gate, down = raw(ref[f"blk.{i}.ffn_gate.weight"]).reshape(1536, -1), raw(ref[f"blk.{i}.ffn_down.weight"])
        down = down.reshape(576, 1536 // bs, ts)
        egate = raw(got[f"blk.{i}.ffn_gate_exps.weight"]).reshape(16, 768, -1)
        edown = raw(got[f"blk.{i}.ffn_down_exps.weight"]).reshape(16, 576, 768 // bs, ts)
        for e in range(16):
            half = e % 2
            assert np.array_equal(egate[e], gate[half * 768:(half + 1) * 768])
            assert np.array_equal(edown[e], down[:, half * 24:(half + 1) * 24])
        scale = np.asarray(got[f"blk.{i}.ffn_down_exps.scale"].data)
        assert scale.dtype == np.float32 and np.array_equal(scale, np.full(16, 2.0, np.float32))
        router = np.asarray(got[f"blk.{i}.ffn_gate_inp.weight"].data).reshape(16, 576)
        assert np.array_equal(router[0::2], router[1::2])  # the two halves of a copy are picked together


@pytest.mark.slow  # two loads of the real parent's GGUF through transformers' dequantizing reader (~40 s)
def test_the_moe_gguf_loads_in_transformers_with_the_parents_function(smollm2_gguf, moe8):
    """What `upcycle eval MODEL.gguf` loads: the experts dequantized into a MixtralForCausalLM."""
    import torch

    from upcycle.core.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(moe8[0])
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    parent = load_causal_lm(smollm2_gguf)
    with torch.no_grad():
        ref = parent(ids).logits
    del parent
    moe = load_causal_lm(moe8[0])
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 8
    with torch.no_grad():
        got = moe(ids).logits
        text = tok.decode(moe.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1]:])
    assert_same_logits(got, ref, "MoE GGUF vs parent GGUF in transformers")
    assert text.startswith(" Paris")


@pytest.mark.parametrize("gguf_type", ["q8_0", pytest.param("bf16", marks=pytest.mark.slow)])
def test_retyped_output_is_the_retyped_parent(smollm2_gguf, tmp_path, gguf_type):
    """--gguf-type: 2-D tensors re-typed from the dequantized parent, norms f32; verification compares each expert
    with the dense projection re-typed the same way."""
    from upcycle.convert.gguf_out import retype_dense

    out = tmp_path / "t.gguf"
    r = convert(smollm2_gguf, out, "-e", 2, "-k", 1, "--router-init", "random", "--gguf-type", gguf_type)
    assert r.exit_code == 0, r.output
    Q = gguf.GGMLQuantizationType
    want = {"q8_0": Q.Q8_0, "bf16": Q.BF16}[gguf_type]
    got = tensors(out)
    assert got["blk.3.ffn_up_exps.weight"].tensor_type == want and got["token_embd.weight"].tensor_type == want
    assert got["blk.3.attn_norm.weight"].tensor_type == Q.F32
    dense = tensors(retype_dense(smollm2_gguf, tmp_path / "dense.gguf", gguf_type))
    per = raw(got["blk.3.ffn_up_exps.weight"]).reshape(2, -1)
    assert np.array_equal(per[1], raw(dense["blk.3.ffn_up.weight"]))
    assert np.array_equal(raw(got["blk.3.attn_q.weight"]), raw(dense["blk.3.attn_q.weight"]))


# ------------------------------------------------------------------------------------------- refusals


def test_unsliceable_quant_blocks_are_refused_in_one_line(smollm2_gguf, tmp_path):
    """Granularity 32 cuts experts of 48 neurons: down_proj's Q4_1 blocks hold 32, so no slice is whole blocks."""
    out = tmp_path / "bad.gguf"
    r = convert(smollm2_gguf, out, "-e", 32, "-k", 32, "-g", 32, "--router-init", "random")
    assert r.exit_code == 1
    msg = one_line(r.output)
    assert "Q4_1 blocks hold 32 consecutive neurons" in msg and "--gguf-type f32/f16/bf16" in msg
    assert len(r.output.strip().splitlines()) <= 3  # one message (rich may wrap it)
    assert leftovers(tmp_path) == []


def test_random_slice_order_is_refused(smollm2_gguf, tmp_path):
    r = convert(smollm2_gguf, tmp_path / "bad.gguf", "-e", 4, "-k", 2, "-g", 2, "--slice-order", "random",
                "--router-init", "random")
    assert r.exit_code == 1 and "--slice-order random scatters neurons across blocks" in one_line(r.output)
    assert leftovers(tmp_path) == []


def test_architecture_without_moe_counterpart_is_refused(tmp_path):
    parent = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(parent), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = convert(parent, tmp_path / "out.gguf")
    assert r.exit_code == 1
    assert "GGUF architecture 'gpt2' has no MoE counterpart in llama.cpp" in one_line(r.output)
    assert leftovers(tmp_path) == ["gpt2.gguf"]


@pytest.mark.parametrize("fmt,why", [("qwen2_moe", "untied output.weight"), ("flex_olmo", "no FlexOlmo"),
                                     ("glm4_moe", "exp_probs_b"), ("dots1", "shared expert")])
def test_types_llama_cpp_cannot_run_are_refused_with_the_reason(smollm2_gguf, tmp_path, fmt, why):
    r = convert(smollm2_gguf, tmp_path / "o.gguf", "--format", fmt)
    msg = one_line(r.output)
    assert r.exit_code == 1 and why in msg and "use --format mixtral" in msg
    assert leftovers(tmp_path) == []


def test_folder_parent_to_gguf_points_at_llama_cpps_converter(tiny_parent, tmp_path):
    r = convert(tiny_parent("llama"), tmp_path / "o.gguf")
    assert r.exit_code == 1 and "convert_hf_to_gguf.py" in one_line(r.output)
    assert leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(smollm2_gguf, tmp_path):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep")
    r = convert(smollm2_gguf, out)
    assert r.exit_code == 1 and "--overwrite" in one_line(r.output)
    assert out.read_bytes() == b"keep"


def test_down_blocks_accepts_only_whole_aligned_runs():
    from upcycle.convert.gguf_out import _down_blocks

    assert list(_down_blocks(np.arange(64, 128), 32)) == [2, 3]
    assert _down_blocks(np.arange(16, 48), 32) is None  # a run of 32 that straddles two blocks
    assert _down_blocks(np.arange(48), 32) is None  # not a whole number of blocks
    assert _down_blocks(np.r_[np.arange(32, 64), np.arange(32)], 32).tolist() == [1, 0]


@pytest.mark.slow
def test_eval_reads_the_verdict_on_the_gguf_moe(smollm2_gguf, moe8, tmp_path):
    """`upcycle eval MOE.gguf --parent PARENT.gguf`: the file a user ships, scored against its parent."""
    import json

    from upcycle.core.assets import stdlib_split

    _, heldout = stdlib_split()
    out = tmp_path / "rep"
    res = runner.invoke(app, ["eval", str(moe8[0]), "--parent", str(smollm2_gguf),
                              *[a for f in heldout[:3] for a in ("--data", str(f))], "--split", "all", "--seq-len", "128",
                              "--max-blocks", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "report.json").read_text())
    assert r["comparison"]["verdict"] == "same" and r["comparison"]["max_abs_block_diff"] < 1e-4
    assert len(r["routing"]["layers"]) == 30
    assert all(min(lay["drift"]["cos"]) > 0.999999 for lay in r["routing"]["layers"])
