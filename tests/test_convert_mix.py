"""Experts from several dense checkpoints (--expert-from, --average-shared): what must hold, on tiny random parents.

Sources are tiny parents of the same family and shapes with other random weights (another seed), which is what a
fine-tune of the parent looks like to the converter. Expected tensors are computed here from the source files
with numpy, and the converted models are read back through transformers, not through upcycle's own readers.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from tests.tiny import make_dense_parent
from upcycle.convert import ConvertOptions, convert

FAMILIES = ["llama", "qwen2", "qwen3", "phi3", "olmo2", "granite"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """sources(family) -> (base, [a, b, c]): the parent and three same-shaped parents with other weights."""
    cache: dict = {}

    def make(family: str):
        if family not in cache:
            root = tmp_path_factory.mktemp(f"mix-{family}")
            cache[family] = (make_dense_parent(root / "base", family, seed=0),
                             [make_dense_parent(root / f"src{i}", family, seed=10 + i) for i in range(3)])
        return cache[family]

    return make


def _tensors(folder) -> dict[str, np.ndarray]:
    out: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _mlp(folder, layer: int) -> dict[str, np.ndarray]:
    t = _tensors(folder)
    pre = f"model.layers.{layer}.mlp."
    if pre + "gate_up_proj.weight" in t:  # phi3
        gate, up = np.split(t[pre + "gate_up_proj.weight"], 2, axis=0)
    else:
        gate, up = t[pre + "gate_proj.weight"], t[pre + "up_proj.weight"]
    return {"gate": gate, "up": up, "down": t[pre + "down_proj.weight"]}


def _loaded_experts(model, layer: int) -> dict[str, torch.Tensor]:
    """gate, up (E, I_e, H) and down (E, H, I_e) of one MoE layer, as transformers holds them in memory."""
    found = {}
    for name, p in model.named_parameters():
        if f"layers.{layer}." not in name or p.dim() != 3 or "shared" in name:
            continue
        if name.endswith(("gate_up_proj", "input_linear.weight")):
            found["gate"], found["up"] = p.detach().chunk(2, dim=1)
        elif name.endswith(("down_proj", "output_linear.weight")):
            found["down"] = p.detach()
    assert set(found) == {"gate", "up", "down"}, [n for n, _ in model.named_parameters() if f"layers.{layer}." in n]
    return found


def _same_bits(a, b) -> bool:
    a, b = np.ascontiguousarray(np.asarray(a, np.float32)), np.ascontiguousarray(np.asarray(b, np.float32))
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ---------------------------------------------------------------- every source equal to BASE: the plain upcycle

@pytest.mark.parametrize("family,options", [
    ("llama", dict(experts=4, top_k=2)),
    ("qwen2", dict(experts=6, top_k=3, granularity=4, shared_experts=1)),
    ("phi3", dict(experts=4, top_k=2, granularity=2, moe_layers="1")),
    ("olmo2", dict(experts=4, top_k=2, expert_init="drop:0.5")),
])
@pytest.mark.parametrize("average", [False, True])
def test_sources_equal_to_base_give_the_plain_upcycle_byte_for_byte(sources, tmp_path, family, options, average):
    """The parent itself, and copies of its folder (other files with the same bytes, so they are opened and, with
    --average-shared, averaged): every tensor is the plain conversion's, byte for byte."""
    base, _ = sources(family)
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    convert(base, tmp_path / "plain", verify=False, quiet=True, **options)
    mixed = convert(base, tmp_path / "mixed", verify=False, quiet=True, expert_from=[str(copy), str(base)],
                    average_shared=average, **options)
    a, b = _tensors(tmp_path / "plain"), _tensors(tmp_path / "mixed")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name
    assert json.loads((tmp_path / "plain" / "config.json").read_text()) == \
        json.loads((tmp_path / "mixed" / "config.json").read_text())
    assert mixed.plan.inexact_reason is not None and "other than the parent" in mixed.plan.inexact_reason


def test_every_source_the_parent_itself_is_exact_and_verified(sources, tmp_path):
    base, _ = sources("llama")
    res = convert(base, tmp_path / "m", experts=4, top_k=2, expert_from=[str(base)] * 2, quiet=True, full_check="never")
    assert res.plan.inexact_reason is None
    v = res.verification
    assert v["exact_expected"] and "mixed" not in v and v["max_rel_diff"] < 1e-9
    m = json.loads((tmp_path / "m" / "upcycle.json").read_text())
    assert m["exact_by_construction"] and all(s["is_parent"] for s in m["sources"])


# ---------------------------------------------------------------- expert i is source i's MLP

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("g,options", [(1, dict(experts=3, top_k=2)),
                                       (2, dict(experts=12, top_k=4, granularity=2, average_shared=True))])
def test_each_expert_holds_its_sources_mlp(sources, tmp_path, family, g, options):
    """Read back through transformers: expert e holds its source's MLP neurons (slice e mod G), down_proj times the
    declared scale, byte for byte; attention and norms are the parent's, or the float64 mean of all checkpoints."""
    from transformers import AutoModelForCausalLM

    base, srcs = sources(family)
    out = tmp_path / "m"
    res = convert(base, out, expert_from=[str(s) for s in srcs], verify=False, quiet=True, **options)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    manifest = json.loads((out / "upcycle.json").read_text())
    experts, n = options["experts"], len(srcs)
    per_source = experts // n  # experts each source gives: whole copies of G slices, in order
    width = 128 // g
    for layer in range(2):
        got = _loaded_experts(model, layer)
        mlps = [_mlp(s, layer) for s in srcs]
        for e in range(experts):
            j, piece = e // per_source, e % g
            neurons = np.arange(piece * width, (piece + 1) * width)
            scale = np.float32(manifest["layers"][layer]["experts"][e]["down_scale"])
            assert manifest["layers"][layer]["experts"][e]["source"] == j
            assert _same_bits(got["gate"][e], mlps[j]["gate"][neurons]), (layer, e)
            assert _same_bits(got["up"][e], mlps[j]["up"][neurons]), (layer, e)
            assert _same_bits(got["down"][e], mlps[j]["down"][:, neurons] * scale), (layer, e)
    shared = _tensors(base)
    others = [_tensors(s) for s in srcs]
    state = model.state_dict()
    for name in ("model.layers.1.self_attn.o_proj.weight", "model.layers.0.post_attention_layernorm.weight",
                 "model.norm.weight"):
        want = shared[name]
        if options.get("average_shared"):
            want = ((shared[name].astype(np.float64) + sum(o[name].astype(np.float64) for o in others)) / 4).astype(np.float32)
        assert _same_bits(state[name].numpy(), want), name
    assert res.plan.sources.shared_from.startswith("the mean" if options.get("average_shared") else "the parent")


# ---------------------------------------------------------------- manifest, card, summary

def test_manifest_lists_every_source_with_its_hash(sources, tmp_path):
    from upcycle.storage.manifest import read_manifest, tensor_digest
    from upcycle.storage.sources import SafetensorsSource

    base, srcs = sources("llama")
    convert(base, tmp_path / "m", experts=6, top_k=2, expert_from=[str(srcs[0]), str(base), str(srcs[1])],
            verify=False, quiet=True)
    data = json.loads((tmp_path / "m" / "upcycle.json").read_text())
    assert [s["source"] for s in data["sources"]] == [str(srcs[0]), str(base), str(srcs[1])]
    assert [s["is_parent"] for s in data["sources"]] == [False, True, False]
    for entry, folder in zip(data["sources"], [srcs[0], base, srcs[1]]):
        src = SafetensorsSource(folder)
        assert entry["tensors_sha256"] == tensor_digest(src)
        src.close()
    assert data["recipe"]["expert_from"] == [str(srcs[0]), str(base), str(srcs[1])]
    assert data["exact_by_construction"] is False and "other than the parent" in data["not_exact_because"]
    m = read_manifest(tmp_path / "m")
    assert m.mixed and [m.expert_source(0, e) for e in range(6)] == [str(srcs[0])] * 2 + [str(base)] * 2 + [str(srcs[1])] * 2


def test_eval_measures_drift_of_mixed_experts_against_the_mean_expert(sources, tmp_path):
    """The parent's neurons are not where a mixed expert came from: eval says so instead of reporting drift from it."""
    from upcycle.storage.manifest import read_manifest
    from upcycle.evaluate.drift import REFERENCE_MEAN, ExpertWeights, ParentMLP, layer_drift

    base, srcs = sources("llama")
    convert(base, tmp_path / "m", experts=2, top_k=2, expert_from=[str(srcs[0]), str(base)], verify=False, quiet=True)
    w = ExpertWeights(0, torch.randn(2, 128, 64), torch.randn(2, 128, 64), torch.randn(2, 64, 128))
    parent = {0: ParentMLP(torch.randn(128, 64), torch.randn(128, 64), torch.randn(64, 128))}
    drift, why = layer_drift(w, parent, read_manifest(tmp_path / "m"))
    assert drift.reference == REFERENCE_MEAN and "several checkpoints (--expert-from)" in why


def test_verification_measures_the_distance_and_the_card_says_so(sources, tmp_path):
    """Not the parent's function: not failed, measured end to end; the numbers agree with transformers run in
    float64 on the same tokens, and the card and summary print them."""
    from transformers import AutoModelForCausalLM

    from upcycle.convert.parent_pass import prompt_ids
    from upcycle.convert.verify_mix import compare_logits

    base, srcs = sources("qwen3")
    out = tmp_path / "m"
    res = convert(base, out, experts=4, top_k=2, granularity=2, expert_from=[str(s) for s in srcs[:2]],
                  average_shared=True, quiet=True, full_check="never")
    v = res.verification
    assert not v["exact_expected"] and v["expert_max_rel_diff"] == 0.0 and v["expert_tensors"] == 2 * 4 * 3
    mixed = v["mixed"]
    ids = torch.tensor(prompt_ids(out)).unsqueeze(0)
    parent = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64, experts_implementation="eager")
    with torch.no_grad():
        ref = compare_logits(parent(ids).logits[0], moe(ids).logits[0])
    assert mixed["tokens"] == ref["tokens"] == ids.shape[1]
    assert mixed["mean_kl"] > 1e-3  # really another function
    for key in ("max_abs_logit_diff", "mean_kl", "max_kl"):
        assert mixed[key] == pytest.approx(ref[key], rel=1e-6), key
    assert mixed["top1_agree"] == ref["top1_agree"]
    card = (out / "README.md").read_text()
    assert "does NOT compute what the parent computes" in card
    assert f"mean KL(parent || MoE) {mixed['mean_kl']:.3g} nats" in card
    assert str(srcs[0]) in card and "the mean over the parent and 2 distinct source(s)" in card


def test_a_wrong_expert_byte_fails_verification_naming_its_source(sources, tmp_path):
    """Experts copied from a source are checked against that source's bytes, strictly, even though the function
    is not the parent's."""
    from safetensors.numpy import save_file

    from upcycle.convert.mix import open_sources
    from upcycle.storage.parent import open_parent
    from upcycle.convert.recipe import Recipe
    from upcycle.convert.run import build_plan
    from upcycle.convert.verify import verify_layers
    from upcycle.core.errors import VerificationError

    base, srcs = sources("llama")
    out = tmp_path / "m"
    recipe = Recipe(experts=2, top_k=2, expert_from=(str(srcs[0]), str(srcs[1])), router_init="random")
    convert(base, ConvertOptions(out=out, recipe=recipe, verify=False), quiet=True)
    t = _tensors(out)
    name = "model.layers.1.block_sparse_moe.experts.1.w3.weight"
    t[name] = t[name].copy()
    t[name][3, 5] = np.nextafter(t[name][3, 5], np.float32(np.inf))  # one unit in the last place
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    ckpt = open_parent(base)
    mix = open_sources(ckpt, recipe.expert_from, average=False)
    try:
        plan, _ = build_plan(ckpt, recipe, sources=mix)
        with pytest.raises(VerificationError, match=rf"layer 1: {name} \(expert 1, up_proj\) differs from the "
                                                    rf"--expert-from {srcs[1]} neurons"):
            verify_layers(ckpt, plan, out, exact=False)
    finally:
        mix.close()
        ckpt.close()


# ---------------------------------------------------------------- router init with sources

def test_random_and_kmeans_routers_are_the_plain_ones(sources, tmp_path):
    """The router does not depend on where the experts come from: random rows from the seed, k-means on the parent."""
    import sysconfig
    from pathlib import Path

    base, srcs = sources("llama")
    text = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    for init in ("random", f"kmeans:{text}"):
        kw = dict(experts=4, top_k=2, router_init=init, verify=False, quiet=True)
        convert(base, tmp_path / f"plain-{init[:6]}", **kw)
        convert(base, tmp_path / f"mix-{init[:6]}", expert_from=[str(srcs[0]), str(srcs[1])], **kw)
        a, b = _tensors(tmp_path / f"plain-{init[:6]}"), _tensors(tmp_path / f"mix-{init[:6]}")
        for layer in range(2):
            name = f"model.layers.{layer}.block_sparse_moe.gate.weight"
            assert a[name].tobytes() == b[name].tobytes()


def _domain_texts():
    """Real text found on every machine: Python sources, and the English prose of Python's own reference topics."""
    import pydoc_data.topics

    from upcycle.core.assets import stdlib_dir

    code = [(stdlib_dir() / f).read_text()[:1500] for f in ("textwrap.py", "shlex.py")]
    prose = [pydoc_data.topics.topics[k][:1500] for k in ("assignment", "exceptions")]
    return code, prose


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_prompts_router_rows_come_from_each_sources_hidden_states(sources, tmp_path, fmt):
    """Each source's row, recomputed here from transformers' own model in float64 (hooks on every MLP's input,
    each source's texts run alone), matches the written router; the rows are tied within virtual groups."""
    from transformers import AutoModelForCausalLM

    from tests.tiny import byte_tokenizer

    base, srcs = sources("llama")
    code, prose = _domain_texts()
    prompts = tmp_path / f"prompts.{fmt}"
    mapping = {str(srcs[0]): code, str(srcs[1]): prose}
    if fmt == "json":
        prompts.write_text(json.dumps(mapping))
    else:
        import yaml

        prompts.write_text(yaml.safe_dump(mapping))
    out = tmp_path / "m"
    res = convert(base, out, experts=4, top_k=2, granularity=2, expert_from=[str(srcs[0]), str(srcs[1])],
                  router_init=f"prompts:{prompts}", verify=True, quiet=True, full_check="never")
    assert res.verification["mixed"]["tokens"] > 0
    written = _tensors(out)

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64, attn_implementation="eager")
    tok = byte_tokenizer()
    per_layer: dict = {0: [], 1: []}
    hooks = [model.model.layers[i].mlp.register_forward_pre_hook(
        lambda m, args, i=i: per_layer[i].append(args[0][0].clone())) for i in range(2)]
    with torch.no_grad():
        for texts in (code, prose):
            ids = tok("\n\n".join(texts)).input_ids[:512]
            model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    for layer in range(2):
        xs = per_layer[layer]
        means = torch.stack([torch.nn.functional.normalize(x, dim=-1).mean(0) for x in xs])
        rows = torch.nn.functional.normalize(means - means.mean(0), dim=-1)
        rows = rows / (torch.cat(xs) @ rows.T).std()
        got = written[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        assert np.array_equal(got[0], got[1]) and np.array_equal(got[2], got[3])  # groups of 2 slices tied
        np.testing.assert_allclose(got[::2], rows.numpy().astype(np.float32), rtol=1e-5, atol=1e-6)
        # the rows tell the domains apart: each source's own texts score its row higher than the other's
        assert float((xs[0] @ rows[0] - xs[0] @ rows[1]).mean()) > 0 > float((xs[1] @ rows[0] - xs[1] @ rows[1]).mean())


def test_prompts_keys_may_name_a_source_by_another_path(sources, tmp_path, monkeypatch):
    base, srcs = sources("llama")
    code, prose = _domain_texts()
    monkeypatch.chdir(srcs[0].parent)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({srcs[0].name: code, f"./{srcs[1].name}/": prose}))
    res = convert(base, tmp_path / "m", experts=2, top_k=2, expert_from=[str(srcs[0]), str(srcs[1])],
                  router_init=f"prompts:{prompts}", verify=False, quiet=True)
    assert res.plan.recipe.router_init_mode[0] == "prompts"


@pytest.mark.slow
def test_gguf_and_safetensors_sources_mix(smollm2_gguf, tmp_path):
    """The real SmolLM2 GGUF parent with its own float32 export as the source (and the reverse): other files, the
    same values, so every expert is the parent's MLP byte for byte and the measured distance is float64 roundoff."""
    pytest.importorskip("gguf")
    from upcycle.core.loading import export_dense

    folder = tmp_path / "smollm2-fp32"
    export_dense(smollm2_gguf, folder, dtype="float32")
    for base, source in ((smollm2_gguf, folder), (folder, smollm2_gguf)):
        out = tmp_path / f"m-{type(base).__name__}-{base == folder}"
        res = convert(base, out, experts=2, top_k=2, format="qwen2_moe", moe_layers="0,1",
                      expert_from=[str(source), str(base)], quiet=True, full_check="never")
        v = res.verification
        assert not v["exact_expected"] and v["expert_max_rel_diff"] == 0.0
        assert v["mixed"]["max_rel_logit_diff"] < 1e-9 and v["mixed"]["top1_agree"] == v["mixed"]["tokens"]


def test_parent_run_beside_the_checks_gives_the_same_mixed_report(sources, tmp_path, monkeypatch):
    """With --expert-from and --average-shared the parent's float64 layers may still run in a thread beside the
    writer and the byte checks (they read the parent's own source only): the report, the end-to-end numbers
    included, is the very one of the run in the calling thread. (Tiny parents are below the size where convert
    chooses the thread on its own: it is forced here.)"""
    from upcycle.convert.mix import open_sources
    from upcycle.storage.parent import open_parent
    from upcycle.convert.recipe import Recipe
    from upcycle.convert.run import build_plan
    from upcycle.convert.verify import verify_layers
    from upcycle.convert import memory

    base, srcs = sources("llama")
    recipe = Recipe(experts=4, top_k=2, expert_from=(str(srcs[0]), str(base)), average_shared=True,
                    router_init="random")
    monkeypatch.setattr(memory, "overlap_parent", lambda plan, thread_safe: thread_safe)
    threaded = convert(base, ConvertOptions(out=tmp_path / "m", recipe=recipe, full_check="never"), quiet=True)
    monkeypatch.undo()
    ckpt = open_parent(base)
    mix = open_sources(ckpt, recipe.expert_from, average=True)
    try:
        plan, _ = build_plan(ckpt, recipe, sources=mix)
        assert not memory.overlap_parent(plan, ckpt.source.thread_safe)
        inline = verify_layers(ckpt, plan, tmp_path / "m", exact=False)
    finally:
        mix.close()
        ckpt.close()
    v = {k: x for k, x in threaded.verification.items() if not k.startswith("whole_model")}
    assert v["mixed"]["mean_kl"] > 1e-3 and v["layers"]
    assert v == inline
