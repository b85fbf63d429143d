"""Tiny random models and a byte-level tokenizer, built in-process so that tests never touch a model hub.

Norms and biases are drawn at random (not left at ones and zeros): an upcycling bug that only shows with
non-trivial norms or biases must not hide behind the default initialisation.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(
    vocab_size=260,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
)

# What a tiny parent of each family needs beyond TINY to exercise its peculiarities.
FAMILY_EXTRAS: dict[str, dict] = {
    "llama": dict(head_dim=16),
    "mistral": dict(head_dim=16, sliding_window=None),
    "qwen2": dict(),
    "qwen3": dict(head_dim=16),
    "phi3": dict(),
    "olmo2": dict(),
    "granite": dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=4.0),
}


def byte_tokenizer():
    """A 260-token byte-level BPE tokenizer with no merges: 256 bytes plus bos/eos/pad/unk specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for tok in ("<s>", "</s>", "<pad>", "<unk>"):
        vocab[tok] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "norm" in name or "layernorm" in name:
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)


def make_dense_parent(out: Path | str, family: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a tiny random dense parent of `family` (with tokenizer) as a safetensors folder; return its path."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    out = Path(out)
    kwargs = {**TINY, **FAMILY_EXTRAS[family], **overrides}
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_(model, seed)
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    GenerationConfig(bos_token_id=256, eos_token_id=257, pad_token_id=258).save_pretrained(out)
    return out


# Exactness bound, relative to the logits' scale. float32 reordering noise between a dense MLP and its experts is
# 2e-7..1e-6 on logits of magnitude 0.6-2.5 (below 1e-6 of the largest logit); a real conversion bug (a wrong
# down_proj scale, a missing bias) is far above it. 1e-5 of the largest |logit| leaves a 10x margin both ways:
# a uniform 1e-4 relative scale error fails (tests/test_exact_bound.py proves it).
EXACT_RTOL = 1e-5


def exact_bound(ref) -> float:
    """The largest max |got - ref| that still counts as the same logits as `ref`."""
    return EXACT_RTOL * float(ref.abs().max())


def assert_same_logits(got, ref, what: str = "") -> None:
    """got reproduces ref up to float32 noise: max |got - ref| <= EXACT_RTOL * max |ref|."""
    assert got.shape == ref.shape, f"{what}: shapes {tuple(got.shape)} vs {tuple(ref.shape)}"
    diff, bound = float((got - ref).abs().max()), exact_bound(ref)
    assert diff <= bound, f"{what}: max |diff| {diff:.3g} > {bound:.3g} ({EXACT_RTOL:g} of max |logit|)"


def one_line(text: str) -> str:
    """Rich wraps long messages; tests compare them as one line."""
    return " ".join(text.split())


def routers_before_and_after_patch(layers, h):
    """Router outputs (logits, weights, indices) of every MoE layer on hidden states h, from transformers' router
    and from upcycle's fp32 RouterPatch; asserts they agree (same logits, same chosen experts, same weights) and
    returns (before, after, patch) so the caller can check more and remove the patch."""
    import torch

    from upcycle.train.router import RouterControls, RouterPatch

    before = [m.router(h) for m in layers]
    patch = RouterPatch(layers, RouterControls())
    after = [m.router(h) for m in layers]
    for (l0, w0, i0), (l1, w1, i1) in zip(before, after):
        assert torch.allclose(l0.float(), l1, atol=1e-6)
        order0, order1 = i0.sort(dim=-1), i1.sort(dim=-1)
        assert torch.equal(order0.values, order1.values)
        assert torch.allclose(w0.float().gather(1, order0.indices), w1.float().gather(1, order1.indices), atol=1e-6)
    return before, after, patch
