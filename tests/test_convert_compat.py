"""Converted folders load and compute the parent's function in transformers 4.57 too.

Needs a second interpreter with transformers 4.57 (CI builds one; see .ci/run), named by UPCYCLE_T4_PYTHON.
The reference logits come from the dense parent under this (5.x) interpreter; the 4.57 interpreter only loads
the MoE folder with AutoModelForCausalLM and computes its logits.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from upcycle.convert import convert
from tests.tiny import exact_bound

T4 = os.environ.get("UPCYCLE_T4_PYTHON")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not T4, reason="UPCYCLE_T4_PYTHON (transformers 4.57) not set")]

CASES = [
    ("llama", {}, dict(format="mixtral")),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8}}, dict(format="mixtral")),
    ("llama", {}, dict(format="qwen2_moe", experts=6, top_k=3, granularity=4, shared_experts=1, moe_layers="1")),
    ("mistral", {"sliding_window": 5}, dict(format="qwen2_moe")),
    ("llama", {"tie_word_embeddings": True}, dict(format="glm4_moe", experts=8, top_k=4, granularity=2, shared_experts=1)),
    ("llama", {"attention_bias": True}, dict(format="granitemoeshared", experts=4, top_k=2, granularity=2, shared_experts=1)),
    ("qwen2", {}, dict(format="qwen2_moe", experts=8, top_k=4, granularity=2)),
    ("qwen3", {}, dict(format="qwen3_moe", experts=8, top_k=4, granularity=2)),
    ("qwen3", {}, dict(format="dots1", experts=6, top_k=3, granularity=4, shared_experts=1)),
    ("phi3", {}, dict(format="mixtral")),
    ("olmo2", {}, dict(format="flex_olmo")),
    ("granite", {}, dict(format="granitemoe")),
]

SCRIPT = """
import sys, torch, transformers
from transformers import AutoModelForCausalLM
assert transformers.__version__.startswith("4.57"), transformers.__version__
ids, ref = torch.load(sys.argv[2])
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
with torch.no_grad():
    d = (m(ids).logits - ref).abs().max().item()
print(d)
"""


@pytest.mark.parametrize("family,overrides,options", CASES, ids=[f"{c[0]}-{c[2]['format']}-{i}" for i, c in enumerate(CASES)])
def test_loads_exactly_in_transformers_4_57(tiny_parent, tmp_path, family, overrides, options):
    from transformers import AutoModelForCausalLM

    parent = tiny_parent(family, **overrides)
    out = tmp_path / "moe"
    convert(parent, out, verify=False, quiet=True, **options)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32)(ids).logits
    torch.save((ids, ref), tmp_path / "ref.pt")
    res = subprocess.run([T4, "-c", SCRIPT, str(out), str(tmp_path / "ref.pt")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    diff = float(res.stdout.strip().splitlines()[-1])
    assert diff <= exact_bound(ref), f"transformers 4.57: max |diff| {diff} > {exact_bound(ref)}"
