"""`upcycle eval` end to end through the CLI, on tiny models: a fresh conversion, a 'trained' one, foreign MoE
folders, a dense model alone, and the errors a user can make."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from upcycle.cli import app
from tests.tiny import TINY, byte_tokenizer

runner = CliRunner()
SEQ = ["--seq-len", "64", "--max-blocks", "12", "--batch-size", "4"]


def _invoke(*args):
    return runner.invoke(app, ["eval", *map(str, args)])


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """About 20 KB of real, varied text: Python sources from the standard library."""
    import sysconfig

    std = Path(sysconfig.get_paths()["stdlib"])
    body = "".join((std / name).read_text(encoding="utf-8") for name in ("bisect.py", "colorsys.py", "keyword.py"))
    p = tmp_path_factory.mktemp("data") / "general.txt"
    p.write_text(body[:20000])
    return p


@pytest.fixture(scope="module")
def docs(text, tmp_path_factory) -> Path:
    """The same text as 40 documents (JSON lines): intervals over documents need at least 10 of them."""
    body = text.read_text()
    p = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    p.write_text("".join(json.dumps({"text": body[i:i + 500]}) + "\n" for i in range(0, len(body), 500)))
    return p


@pytest.fixture(scope="module")
def domain_text(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("domain") / "numbers.txt"
    p.write_text(" ".join(str(i * 7919 % 100003) for i in range(3000)))
    return p


@pytest.fixture(scope="module")
def fresh(tiny_parent, tmp_path_factory) -> tuple[Path, Path]:
    """(parent, MoE) where the MoE is a fresh exact conversion: 4 experts, top-2."""
    from upcycle.convert import convert

    parent = tiny_parent("llama")
    out = tmp_path_factory.mktemp("fresh") / "moe"
    convert(parent, out, experts=4, top_k=2, verify=False, quiet=True)
    return parent, out


def _said(res) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(res.output.split())


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_fresh_conversion_matches_its_parent(fresh, docs, tmp_path):
    parent, moe = fresh
    out = tmp_path / "rep"
    res = _invoke(moe, "--parent", parent, "--data", docs, "--split", "all", "--out", out, *SEQ)
    assert res.exit_code == 0, res.output
    r = _report(out)
    assert r["comparison"]["verdict"] == "same"
    assert abs(r["model"]["loss"] - r["parent"]["loss"]) < 1e-5
    assert r["comparison"]["max_abs_block_diff"] < 1e-5
    assert r["model"]["blocks"] == r["parent"]["blocks"] == 12
    assert r["model"]["block_loss"] == pytest.approx(r["parent"]["block_loss"], abs=1e-5)
    lo, hi = r["model"]["loss_ci95"]
    assert lo < r["model"]["loss"] < hi
    assert r["model"]["perplexity"] == pytest.approx(2.718281828 ** r["model"]["loss"], rel=1e-6)
    # 4 experts of the full MLP, top-2: two experts' worth more parameters per layer than the parent is active
    per_expert = 3 * 64 * 128
    assert r["model"]["params"]["total"] - r["parent"]["params"]["total"] == 2 * (3 * per_expert + 4 * 64)
    assert r["model"]["params"]["active_per_token"] - r["parent"]["params"]["active_per_token"] == 2 * (per_expert + 256)
    routing = r["routing"]
    assert [lay["layer"] for lay in routing["layers"]] == [0, 1]
    for lay in routing["layers"]:
        assert len(lay["load"]) == 4 and sum(lay["load"]) == pytest.approx(1.0)
        assert lay["tokens"] == 12 * 64
        assert lay["drift"]["reference"] == "parent"
        assert lay["drift"]["cos"] == pytest.approx([1.0] * 4, abs=1e-6)
    assert routing["drift_note"] is None
    for name in ("loss.png", "expert_load.png", "routing.png", "summary.md"):
        assert (out / name).is_file(), name
    summary = (out / "summary.md").read_text()
    assert "same loss as its parent" in summary and "![expert_load](expert_load.png)" in summary
    said = _said(res)
    assert "same loss as its parent" in said and "@1.25" in said and "entropy" in said


def test_routing_numbers_match_the_models_own_router(fresh, text, tmp_path):
    """Load per expert recomputed independently from transformers' output_router_logits."""
    from upcycle.core.data import spread_blocks
    from upcycle.core.loading import load_causal_lm, load_tokenizer

    parent, moe = fresh
    out = tmp_path / "rep"
    assert _invoke(moe, "--data", text, "--split", "all", "--out", out, "--no-plots", *SEQ).exit_code == 0
    r = _report(out)
    tok = load_tokenizer(moe)
    blocks, _ = spread_blocks(tok, [str(text)], seq_len=64, max_blocks=12, split="all")
    model = load_causal_lm(moe)
    with torch.no_grad():
        logits = model(blocks, output_router_logits=True).router_logits
    for layer, lg in enumerate(logits):
        chosen = lg.float().softmax(-1).topk(2, dim=-1).indices
        load = torch.bincount(chosen.reshape(-1), minlength=4).double() / chosen.numel()
        assert r["routing"]["layers"][layer]["load"] == pytest.approx(load.tolist(), abs=1e-12)
        p = lg.float().softmax(-1)
        entropy = float(-(p * p.log()).sum(-1).mean())
        assert r["routing"]["layers"][layer]["entropy"] == pytest.approx(entropy, rel=1e-5)
    assert r["parent"] is None and r["comparison"] is None
    assert "--parent" in r["routing"]["drift_note"]  # a manifest, but no parent given: mean-expert reference


def test_trained_expert_shows_drift_and_loss_change(fresh, text, tmp_path):
    """Perturb one expert (as training would) in a copy of the fresh MoE: only that expert's cosine drops."""
    from upcycle.core.loading import load_causal_lm

    parent, moe = fresh
    trained = tmp_path / "trained"
    shutil.copytree(moe, trained)
    model = load_causal_lm(trained)
    ex = model.model.layers[1].mlp.experts
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ex.gate_up_proj[2] += 0.5 * ex.gate_up_proj[2].std() * torch.randn(ex.gate_up_proj[2].shape, generator=g)
    model.save_pretrained(trained)
    out = tmp_path / "rep"
    res = _invoke(trained, "--parent", parent, "--data", text, "--split", "all", "--out", out, "--no-plots", *SEQ)
    assert res.exit_code == 0, res.output
    r = _report(out)
    cos = [lay["drift"]["cos"] for lay in r["routing"]["layers"]]
    assert cos[0] == pytest.approx([1.0] * 4, abs=1e-6)
    assert cos[1][:2] == pytest.approx([1.0] * 2, abs=1e-6) and cos[1][3] == pytest.approx(1.0, abs=1e-6)
    assert 0.5 < cos[1][2] < 0.99
    assert r["comparison"]["verdict"] != "same"
    assert r["comparison"]["max_abs_block_diff"] > 1e-3


def _foreign(tmp: Path, kind: str) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    base = {k: v for k, v in TINY.items()}
    torch.manual_seed(1)
    if kind == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**base, head_dim=16, num_local_experts=4, num_experts_per_tok=2))
    else:
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**base, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                                                   shared_expert_intermediate_size=64))
    out = tmp / kind
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_foreign_moe_with_a_parent(kind, tiny_parent, docs, tmp_path):
    moe = _foreign(tmp_path, kind)
    out = tmp_path / "rep"
    res = _invoke(moe, "--parent", tiny_parent("llama"), "--data", docs, "--split", "all", "--out", out,
                  "--layers", "all", *SEQ)
    assert res.exit_code == 0, res.output
    r = _report(out)
    E = 4 if kind == "mixtral" else 6
    assert r["model"]["model_type"] == kind and r["parent"]["model_type"] == "llama"
    assert all(len(lay["load"]) == E for lay in r["routing"]["layers"])
    assert all(lay["drift"]["reference"] == "mean_expert" for lay in r["routing"]["layers"])
    assert "manifest" in r["routing"]["drift_note"]
    assert r["comparison"]["verdict"] in ("better", "worse", "no significant difference")
    assert [s["layer"] for s in r["specialisation"]] == [0, 1]
    profiles = r["specialisation"][0]["experts"]
    assert len(profiles) == E and any(p["top_tokens"] for p in profiles)


def test_dense_model_alone(tiny_parent, text, tmp_path):
    out = tmp_path / "rep"
    res = _invoke(tiny_parent("llama"), "--data", text, "--split", "all", "--out", out, *SEQ)
    assert res.exit_code == 0, res.output
    r = _report(out)
    assert r["routing"] is None and r["parent"] is None and r["specialisation"] is None
    assert r["model"]["loss"] > 0 and r["model"]["params"]["total"] == r["model"]["params"]["active_per_token"]
    assert (out / "loss.png").is_file() and not (out / "expert_load.png").exists()
    assert "@1.25" not in _said(res) and "no parent to compare with" in _said(res)


def test_domain_ranking_uses_the_domains_own_routing(fresh, text, domain_text, tmp_path):
    _, moe = fresh
    out = tmp_path / "rep"
    res = _invoke(moe, "--data", text, "--split", "all", "--domain", domain_text, "--out", out, "--no-plots",
                  "--domain-top", "1", *SEQ)
    assert res.exit_code == 0, res.output
    r = _report(out)
    # the domain's load per expert is exactly what evaluating on the domain text alone gives
    alone = tmp_path / "alone"
    assert _invoke(moe, "--data", domain_text, "--split", "all", "--out", alone, "--no-plots", *SEQ).exit_code == 0
    dom = {d["layer"]: d for d in r["domain"]["layers"]}
    for lay in _report(alone)["routing"]["layers"]:
        assert dom[lay["layer"]]["domain_load"] == pytest.approx(lay["load"], abs=1e-12)
    chosen = json.loads((out / "domain_experts.json").read_text())
    for layer, experts in chosen.items():
        d = dom[int(layer)]
        assert len(experts) == 1 and d["ratio"][experts[0]] == max(x for x in d["ratio"] if x is not None) > 1
    assert r["domain"]["experts_file"] == str(out / "domain_experts.json")
    assert r["model"]["domain"]["blocks"] == 12


def test_run_folder_curves_and_json_output(fresh, text, tmp_path):
    _, moe = fresh
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": i, "loss": 4 - i / 100, "lr": 1e-4, "tokens": 512 * i, "aux_loss": 1.01, "z_loss": 0.2}
            for i in range(1, 31)]
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    out = tmp_path / "rep"
    res = _invoke(moe, "--data", text, "--split", "all", "--out", out, "--run", run, "--json", *SEQ)
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    assert printed == _report(out)
    assert printed["training"]["steps"] == 30 and printed["training"]["tokens"] == 512 * 30
    assert (out / "training.png").is_file()


def test_error_tokenizers_differ(fresh, text, tmp_path):
    parent, moe = fresh
    other = tmp_path / "other"
    shutil.copytree(parent, other)
    tok = byte_tokenizer()
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    res = _invoke(moe, "--parent", other, "--data", text, "--out", tmp_path / "rep", *SEQ)
    assert res.exit_code == 1
    assert "different tokenizers" in _said(res) and "Traceback" not in res.output


def test_error_missing_and_empty_inputs(fresh, text, tmp_path):
    parent, moe = fresh
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        ((moe, "--data", tmp_path / "nope.txt"), "nope.txt"),
        ((moe, "--data", empty), "empty"),
        ((tmp_path / "no-model", "--data", text), "no-model"),
        ((moe, "--parent", tmp_path / "no-parent", "--data", text), "no-parent"),
        ((moe, "--data", text, "--run", tmp_path / "no-run"), "no-run"),
    ]
    for args, needle in cases:
        res = _invoke(*args, "--out", tmp_path / "rep", *SEQ)
        assert res.exit_code == 1, (args, res.output)
        assert needle in _said(res) and "Traceback" not in res.output, res.output
        assert _said(res).startswith("error:") and _said(res).count("error:") == 1, res.output


def test_error_usage_and_existing_report(fresh, text, tmp_path):
    _, moe = fresh
    res = _invoke(moe, "--data", text, "--split", "all", "--layers", "7", "--out", tmp_path / "a", *SEQ)
    assert res.exit_code == 2 and "not MoE layers" in _said(res)
    res = _invoke(moe, "--data", text, "--split", "sometimes", "--out", tmp_path / "b", *SEQ)
    assert res.exit_code == 2 and "--split" in _said(res)
    out = tmp_path / "c"
    assert _invoke(moe, "--data", text, "--split", "all", "--out", out, "--no-plots", *SEQ).exit_code == 0
    res = _invoke(moe, "--data", text, "--split", "all", "--out", out, *SEQ)
    assert res.exit_code == 1 and "--overwrite" in _said(res)
    assert _invoke(moe, "--data", text, "--split", "all", "--out", out, "--overwrite", "--no-plots",
                   *SEQ).exit_code == 0


def test_lm_eval_missing_is_a_clear_error(fresh, text, tmp_path):
    try:
        import lm_eval  # noqa: F401
        pytest.skip("lm-eval is installed")
    except ImportError:
        pass
    _, moe = fresh
    res = _invoke(moe, "--data", text, "--tasks", "hellaswag", "--out", tmp_path / "rep", *SEQ)
    assert res.exit_code == 1 and "pip install lm-eval" in _said(res)


def test_default_split_scores_only_heldout_documents(fresh, text, tmp_path):
    _, moe = fresh
    rows = tmp_path / "docs.jsonl"
    lines = text.read_text().splitlines()
    rows.write_text("\n".join(json.dumps({"text": "\n".join(lines[i:i + 8])}) for i in range(0, len(lines), 8)) + "\n")
    out = tmp_path / "rep"
    res = _invoke(moe, "--data", rows, "--heldout-fraction", "0.3", "--out", out, "--no-plots", *SEQ)
    assert res.exit_code == 0, res.output
    r = _report(out)
    assert r["data"]["split"] == "heldout" and r["data"]["heldout_fraction"] == 0.3
    from upcycle.core.data import spread_blocks
    from upcycle.core.loading import load_tokenizer

    expected, _ = spread_blocks(load_tokenizer(moe), [str(rows)], seq_len=64, max_blocks=12, heldout_fraction=0.3)
    assert r["data"]["blocks"] == expected.shape[0]
    # one file is one document: its held-out share is all or nothing, and the message says what to do
    res = _invoke(moe, "--data", text, "--out", tmp_path / "rep2", *SEQ)
    assert res.exit_code == 1 and "split 'all'" in _said(res)
