"""The exactness bound of tests/tiny.py can tell a real error from float32 noise: it accepts a conversion and
refuses the same conversion with a 1e-4 relative scale error injected into the logits."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import EXACT_RTOL, assert_same_logits
from upcycle.convert import convert

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def _model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def test_bound_accepts_noise_and_refuses_a_1e_4_scale_error(tiny_parent, tmp_path):
    parent = tiny_parent("llama")
    out = tmp_path / "moe"
    convert(parent, out, experts=8, top_k=4, granularity=2, verify=False, quiet=True)
    with torch.no_grad():
        ref = _model(parent)(IDS).logits
        moe = _model(out)
        got = moe(IDS).logits
        assert_same_logits(got, ref, "the conversion itself")
        # the error injected inside the model, where a wrong scale would come from: lm_head off by 1e-4
        moe.lm_head.weight.mul_(1 + 1e-4)
        wrong = moe(IDS).logits
    assert float((wrong - got).abs().max()) > 0
    with pytest.raises(AssertionError, match="max \\|diff\\|"):
        assert_same_logits(wrong, ref, "1e-4 scale error")
    # and on the logits directly, in both directions
    for factor in (1 + 1e-4, 1 - 1e-4):
        with pytest.raises(AssertionError):
            assert_same_logits(ref * factor, ref)
    # the margin: the error is >= 5x the bound, real float32 noise (measured here) <= 1/5 of it
    bound = EXACT_RTOL * float(ref.abs().max())
    assert float((ref * (1 + 1e-4) - ref).abs().max()) >= 5 * bound
    assert float((got - ref).abs().max()) <= bound / 5
