"""Exactness: every combination the converter accepts as exact reproduces the parent's logits.

The expected support matrix is written out here, one row per MoE type, from transformers' modeling code and
tests on tiny parents, rather than read from the registry in upcycle.families.moe, so that a wrong entry in the
registry fails in one direction or the other. Adding an MoE type = one module in upcycle/families/moe/ + one
row in TYPES.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from upcycle.convert import convert
from upcycle.core.errors import UnsupportedError
from tests.tiny import assert_same_logits

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "granite"]
_LLAMA_LIKE = {"llama", "mistral", "phi3"}
# parents: dense families it holds exactly; shared: has shared experts; dense: which layers may stay dense
# (None, "any", "prefix"); routings: the routing-weight rules (--routing) its router can compute.
TYPES = {
    "mixtral": dict(parents=_LLAMA_LIKE, shared=False, dense=None, routings={"renorm"}),
    "qwen2_moe": dict(parents=_LLAMA_LIKE | {"qwen2"}, shared=True, dense="any", routings={"renorm", "softmax"}),
    "qwen3_moe": dict(parents={"qwen3"}, shared=False, dense="any", routings={"renorm", "softmax"}),
    "granitemoe": dict(parents=_LLAMA_LIKE | {"qwen2", "granite"}, shared=False, dense=None, routings={"renorm"}),
    "granitemoeshared": dict(parents=_LLAMA_LIKE | {"qwen2", "granite"}, shared=True, dense=None, routings={"renorm"}),
    "dots1": dict(parents={"qwen3"}, shared=True, dense="prefix", routings={"renorm", "sigmoid"}),
    "glm4_moe": dict(parents=_LLAMA_LIKE | {"qwen2", "qwen3"}, shared=True, dense="prefix", routings={"renorm", "sigmoid"}),
    "flex_olmo": dict(parents={"olmo2"}, shared=False, dense=None, routings={"renorm", "softmax"}),
}
SUPPORT = {fam: {t for t, row in TYPES.items() if fam in row["parents"]} for fam in FAMILIES}
ALL_FORMATS = list(TYPES)
SHARED = {t for t, row in TYPES.items() if row["shared"]}
DENSE_ANY = {t for t, row in TYPES.items() if row["dense"] == "any"}
DENSE_PREFIX = {t for t, row in TYPES.items() if row["dense"] == "prefix"}


def test_every_registered_type_has_a_row():
    """A type module without a row here (or a row without a module) is caught before anything else."""
    from upcycle.families.moe import MOE_TYPES, format_names

    assert set(MOE_TYPES) == set(TYPES)
    assert set(format_names()) == {"auto", *TYPES}

# (name, options, which formats can take it)
RECIPES = [
    ("coarse-8x2", dict(experts=8, top_k=2), None),
    ("fine-G2-8x4", dict(experts=8, top_k=4, granularity=2), None),
    ("fine-G4-shared1", dict(experts=6, top_k=3, granularity=4, shared_experts=1), SHARED),
    ("shared-whole-copy", dict(experts=4, top_k=2, granularity=2, shared_experts=2), SHARED),
    ("dense-first-layer", dict(moe_layers="1"), DENSE_ANY | DENSE_PREFIX),
    ("dense-last-layer", dict(moe_layers="0"), DENSE_ANY),
    ("fine-G4-random-slices", dict(experts=6, top_k=3, granularity=4, shared_experts=1, slice_order="random", seed=3), SHARED),
]

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(folder, ids=IDS, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    with torch.no_grad():
        return model(ids).logits


def max_diff(parent, moe, **kwargs) -> float:
    return float((logits(parent) - logits(moe, **kwargs)).abs().max())


CASES = [(fam, fmt) for fam in SUPPORT for fmt in ALL_FORMATS]


@pytest.mark.parametrize("family,fmt", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_matrix(tiny_parent, tmp_path, family, fmt):
    parent = tiny_parent(family)
    if fmt not in SUPPORT[family]:
        with pytest.raises(UnsupportedError, match=f"--format {fmt} cannot hold this {family} parent exactly"):
            convert(parent, tmp_path / "out", format=fmt, verify=False, quiet=True)
        assert not (tmp_path / "out").exists()
        return
    ref = logits(parent)
    for name, options, formats in RECIPES:
        out = tmp_path / name
        if formats is not None and fmt not in formats:
            with pytest.raises(UnsupportedError):
                convert(parent, out, format=fmt, verify=False, quiet=True, **options)
            continue
        convert(parent, out, format=fmt, verify=False, quiet=True, **options)
        assert_same_logits(logits(out), ref, f"{family} -> {fmt} {name}")


VARIANTS = [
    ("mistral", dict(sliding_window=5)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    ("qwen3", dict(use_sliding_window=True, sliding_window=5, max_window_layers=0)),
    ("llama", dict(tie_word_embeddings=True)),
    ("llama", dict(attention_bias=True)),
    ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8})),
    ("qwen2", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                    "original_max_position_embeddings": 8})),
    ("llama", dict(num_key_value_heads=1, head_dim=32)),
    ("phi3", dict(partial_rotary_factor=0.5)),
    ("qwen3", dict(attention_bias=True)),
    ("olmo2", dict(attention_bias=True)),
    ("granite", dict(tie_word_embeddings=True)),
]


@pytest.mark.parametrize("family,overrides", VARIANTS, ids=[f"{f}-{'-'.join(o)}" for f, o in VARIANTS])
def test_parent_features_carry_over(tiny_parent, tmp_path, family, overrides):
    """Sliding windows, tied embeddings, rope scaling, biases, GQA/head_dim, partial rotary stay exact."""
    parent = tiny_parent(family, **overrides)
    for options in (dict(), dict(experts=8, top_k=4, granularity=2)):
        out = tmp_path / str(len(options))
        convert(parent, out, verify=False, quiet=True, **options)
        assert_same_logits(logits(out), logits(parent), f"{family} {overrides} {options}")


def test_sliding_window_matters(tiny_parent, tmp_path):
    """Guard for the test above: with a window shorter than the input, dropping it would change the logits."""
    import json

    parent = tiny_parent("mistral", sliding_window=5)
    out = tmp_path / "moe"
    convert(parent, out, verify=False, quiet=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["sliding_window"] == 5
    cfg["sliding_window"] = None
    (out / "config.json").write_text(json.dumps(cfg))
    assert max_diff(parent, out) > 1e-3


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
@pytest.mark.parametrize("fmt", ["qwen2_moe", "glm4_moe", "granitemoeshared"])
def test_exact_under_every_experts_implementation(tiny_parent, tmp_path, fmt, impl):
    parent = tiny_parent("llama")
    out = tmp_path / "moe"
    convert(parent, out, format=fmt, experts=6, top_k=3, granularity=4, shared_experts=1, verify=False, quiet=True)
    assert_same_logits(logits(out, experts_implementation=impl), logits(parent), f"{fmt} {impl}")


def test_bfloat16_output_is_exact_up_to_storage(tiny_parent, tmp_path):
    """In bf16 the only difference is the rounding of the parent's weights (scales are powers of two)."""
    from transformers import AutoModelForCausalLM

    parent = tiny_parent("qwen2")
    out = tmp_path / "moe"
    res = convert(parent, out, dtype="bfloat16", experts=8, top_k=4, granularity=2, verify=True, quiet=True)
    assert res.verification["exact_expected"] and res.verification["max_abs_diff"] < 1e-4
    ref = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.bfloat16().float())
        rounded = ref(IDS).logits
    assert_same_logits(logits(out), rounded, "bf16 output vs bf16-rounded parent")
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.experts.0.gate_proj.weight").dtype == torch.bfloat16


def test_non_power_of_two_scale_in_bf16_is_not_claimed_exact(tiny_parent, tmp_path):
    parent = tiny_parent("llama", intermediate_size=96)
    res = convert(parent, tmp_path / "bf16", dtype="bfloat16", format="qwen2_moe", experts=6, top_k=3, granularity=3,
                  verify=True, quiet=True)
    assert res.verification["exact_expected"] is False
    # the same recipe in float32 is exact (scale 3 on down_proj, no rounding)
    res = convert(parent, tmp_path / "fp32", format="qwen2_moe", experts=6, top_k=3, granularity=3, verify=True, quiet=True)
    assert res.verification["exact_expected"] and res.verification["max_abs_diff"] < 1e-4


def test_glm4_carries_non_power_of_two_scale_in_config(tiny_parent, tmp_path):
    """glm4_moe/dots1 put the group scale in routed_scaling_factor, so bf16 stays exact with groups of 3."""
    import json

    parent = tiny_parent("llama", intermediate_size=96)
    res = convert(parent, tmp_path / "g", dtype="bfloat16", format="glm4_moe", experts=6, top_k=3, granularity=4,
                  shared_experts=1, verify=True, quiet=True)
    assert res.verification["exact_expected"] and res.verification["max_abs_diff"] < 1e-4
    assert json.loads((tmp_path / "g" / "config.json").read_text())["routed_scaling_factor"] == 3.0


def test_bf16_rounding_matches_torch():
    from upcycle.core.tensors import from_f32, to_f32

    x = torch.randn(10000) * 10 ** torch.randint(-30, 30, (10000,)).float()
    x[:4] = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0])
    ours = from_f32(x.numpy(), "BF16")
    theirs = x.bfloat16().view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    assert np.array_equal(to_f32(ours, "BF16"), x.bfloat16().float().numpy())
