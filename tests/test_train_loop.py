"""`upcycle.train.train()` end to end on tiny models: the run folder and its metrics, Hugging Face checkpoints with
per-expert keys, budgets, gradient accumulation, what trains, routing controls, precision, gradient checkpointing,
validation and stopping on a non-finite loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from upcycle.core.assets import stdlib_dir
from upcycle.core.errors import TrainingError
from upcycle.storage.sources import read_safetensors_header
from upcycle.train import TrainConfig, train
from upcycle.train import checkpoint as ck

DATA = stdlib_dir() / "json"  # five real Python files, about 60k byte tokens


def config(model, out, **kw) -> TrainConfig:
    base = dict(model=str(model), data=[str(DATA)], out=Path(out), steps=3, seq_len=32, batch_size=2, save_every=0,
                precision="fp32", experts_impl="eager", eval_every=0)
    return TrainConfig(**{**base, **kw})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / ck.METRICS).read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_run_folder_metrics_and_checkpoints(moe, tmp_path):
    from transformers import AutoModelForCausalLM

    src = moe()
    run = tmp_path / "run"
    res = train(config(src, run, steps=4, save_every=2, warmup_steps=1, lr=1e-3))
    assert res.steps == 4 and res.tokens == 4 * 64 and res.final == run / "final"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2", "checkpoint-4", "final", "metrics.jsonl", "run.json"]
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["tokens"] for r in rows] == [64, 128, 192, 256]
    for r in rows:
        for key in ("loss", "lr", "aux_loss", "z_loss", "grad_norm", "tokens_per_s", "load_cv", "load_imbalance",
                    "dropped_frac", "router_entropy", "layer_load_cv", "layer_dropped_frac", "layer_router_entropy",
                    "expert_load"):
            assert key in r, key
        assert len(r["layer_load_cv"]) == len(r["layer_router_entropy"]) == 2  # both layers are MoE
        assert set(r["expert_load"]) == {"0", "1"} and all(abs(sum(v) - 1) < 1e-4 for v in r["expert_load"].values())
        assert r["dropped_frac"] == 0.0  # dropless by default
        assert 0 < r["router_entropy"] <= r["router_entropy_max"] + 1e-6
    # warmup 1, then cosine from 1e-3 to 1e-4 at the last step
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 1e-3, 5.5e-4, 1e-4])
    assert rows[-1]["loss"] < rows[0]["loss"]
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["total_steps"] == 4 and run_json["moe_layers"] == [0, 1] and run_json["experts_impl"] == "eager"

    # every checkpoint and final/ is a standard Hugging Face folder with convert's per-expert keys
    ref = {k: v for k, v in read_safetensors_header(src / "model.safetensors").items()}
    for name in ("checkpoint-2", "checkpoint-4", "final"):
        folder = run / name
        got = {}
        for f in folder.glob("*.safetensors"):
            got.update(read_safetensors_header(f))
        assert set(got) == set(ref) and any(".experts.3.w1.weight" in k for k in got)
        assert json.loads((folder / "config.json").read_text())["model_type"] == "mixtral"
        assert (folder / "tokenizer.json").is_file() and (folder / "upcycle.json").is_file()
        model = AutoModelForCausalLM.from_pretrained(folder)
        ids = torch.tensor([[1, 2, 3, 4]])
        assert torch.isfinite(model(ids).logits).all()
    state = json.loads((run / "checkpoint-2" / ck.STATE_FILE).read_text())
    assert state["step"] == 2 and state["tokens"] == 128 and state["data"]["blocks_yielded"] == 4
    assert (run / "checkpoint-2" / ck.TRAINER_DIR / "optimizer.bin").is_file()
    assert not (run / "final" / ck.TRAINER_DIR).exists()
    # the final weights are the weights after the last step: checkpoint-4 and final agree
    w4, wf = weights(run / "checkpoint-4"), weights(run / "final")
    assert all(torch.equal(w4[k], wf[k]) for k in w4)
    w0 = weights(src)
    assert not torch.equal(w0["model.layers.0.block_sparse_moe.gate.weight"], wf["model.layers.0.block_sparse_moe.gate.weight"])


def test_token_budget_and_save_dtype(moe, tmp_path):
    res = train(config(moe(), tmp_path / "r", steps=None, tokens="130", save_dtype="bfloat16", keep_checkpoints=1,
                       save_every=1))
    assert res.steps == 3  # ceil(130 / (32 * 2))
    assert [s for s, _ in ck.checkpoints(tmp_path / "r")] == [3]  # --keep-checkpoints 1
    w = weights(tmp_path / "r" / "final")
    assert w["model.layers.0.block_sparse_moe.experts.0.w1.weight"].dtype == torch.bfloat16
    assert weights(tmp_path / "r" / "checkpoint-3")["model.embed_tokens.weight"].dtype == torch.float32
    assert json.loads((tmp_path / "r" / "final" / "config.json").read_text())["dtype"] == "bfloat16"


def test_gradient_accumulation_equals_the_larger_batch(moe, tmp_path):
    """batch 4 = 2 micro-batches of 2: same blocks, same losses and same weights (the aux loss, computed per
    micro-batch as in Switch, is switched off: it is not linear in the batch)."""
    a = train(config(moe(), tmp_path / "a", batch_size=4, aux_loss_coef=0.0))
    b = train(config(moe(), tmp_path / "b", batch_size=2, grad_accum=2, aux_loss_coef=0.0))
    assert a.tokens == b.tokens == 3 * 128
    la, lb = [r["loss"] for r in metrics(tmp_path / "a")], [r["loss"] for r in metrics(tmp_path / "b")]
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    wa, wb = weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


def test_train_router_only(moe, tmp_path):
    src = moe()
    train(config(src, tmp_path / "r", train=["router"], router_lr_mult=10.0, lr=1e-3))
    row = metrics(tmp_path / "r")[0]
    assert row["router_lr"] == pytest.approx(1e-2)
    w0, w1 = weights(src), weights(tmp_path / "r" / "final")
    changed = {k for k in w0 if not torch.equal(w0[k], w1[k])}
    assert changed == {f"model.layers.{i}.block_sparse_moe.gate.weight" for i in (0, 1)}
    run_json = json.loads((tmp_path / "r" / "run.json").read_text())
    assert set(run_json["trainable"]) == {"router"}


def test_train_some_experts(moe, tmp_path):
    """experts:0=1 trains expert 1 of layer 0 only; every other tensor (other experts of the same fused
    parameter included) stays bit-identical."""
    src = moe()
    train(config(src, tmp_path / "r", train=["experts:0=1"], lr=1e-3, weight_decay=0.1))
    w0, w1 = weights(src), weights(tmp_path / "r" / "final")
    changed = {k for k in w0 if not torch.equal(w0[k], w1[k])}
    assert changed == {f"model.layers.0.block_sparse_moe.experts.1.{w}.weight" for w in ("w1", "w2", "w3")}


def test_train_attention_and_embeddings(moe, tmp_path):
    src = moe("qwen2_moe", shared_experts=1, granularity=2)
    train(config(src, tmp_path / "r", train=["attention", "embeddings"], lr=1e-3))
    w0, w1 = weights(src), weights(tmp_path / "r" / "final")
    changed = {k for k in w0 if not torch.equal(w0[k], w1[k])}
    assert changed and all("self_attn" in k or "embed_tokens" in k or k == "lm_head.weight" for k in changed)
    assert "model.embed_tokens.weight" in changed and any(k.endswith("q_proj.bias") for k in changed)


def test_capacity_factor_drops_and_is_reported(moe, tmp_path):
    train(config(moe(), tmp_path / "r", capacity_factor=0.5, experts_impl="grouped_mm", router_jitter=0.01))
    for r in metrics(tmp_path / "r"):
        # at factor 0.5 each expert takes at most half the balanced share: at least half the assignments drop
        assert r["dropped_frac"] >= 0.5 - 1e-9 and all(d >= 0.5 - 1e-9 for d in r["layer_dropped_frac"])
        assert torch.isfinite(torch.tensor(r["loss"]))


def test_aux_loss_free_bias_balancing(moe, tmp_path):
    src = moe("glm4_moe")
    train(config(src, tmp_path / "r", aux_free_bias=True, bias_update_rate=0.01, aux_loss_coef=0.0, steps=3))
    w = weights(tmp_path / "r" / "final")
    bias = w["model.layers.0.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32  # kept fp32 in every save dtype
    # three steps of +-0.01 (0 for an expert exactly at the mean): multiples of 0.01 within [-0.03, 0.03]
    steps = bias / 0.01
    assert bias.abs().max() > 0 and torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 3 + 1e-4
    # one step: each expert's bias is exactly -0.01 x the sign of its load against the mean (overloaded pushed down)
    train(config(src, tmp_path / "one", aux_free_bias=True, bias_update_rate=0.01, aux_loss_coef=0.0, steps=1))
    bias = weights(tmp_path / "one" / "final")["model.layers.0.mlp.gate.e_score_correction_bias"]
    load = torch.tensor(metrics(tmp_path / "one")[0]["expert_load"]["0"])
    assert torch.allclose(bias, -0.01 * torch.sign(load - load.mean()), atol=1e-6), (bias, load)


def test_dense_parent_baseline(tiny_parent, tmp_path):
    res = train(config(tiny_parent("llama"), tmp_path / "r", steps=2))
    rows = metrics(tmp_path / "r")
    assert res.steps == 2 and "load_cv" not in rows[0] and rows[0]["aux_loss"] == 0.0
    assert json.loads((tmp_path / "r" / "final" / "config.json").read_text())["model_type"] == "llama"


def test_bf16_and_gradient_checkpointing(moe, tmp_path):
    """bf16 autocast trains on CPU with finite losses; gradient checkpointing gives the same losses and the same
    weights as without (the router losses still reach the router through the recomputed layers)."""
    train(config(moe(), tmp_path / "a", steps=2, router_jitter=0.01))
    train(config(moe(), tmp_path / "b", steps=2, router_jitter=0.01, gradient_checkpointing=True))
    ma, mb = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    for key in ("loss", "aux_loss", "z_loss", "grad_norm"):
        assert [r[key] for r in ma] == pytest.approx([r[key] for r in mb], rel=1e-5)
    wa, wb = weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6
    c = train(config(moe(), tmp_path / "c", steps=2, precision="bf16"))
    mc = metrics(tmp_path / "c")
    assert c.final_loss is not None and all(torch.isfinite(torch.tensor(r["loss"])) for r in mc)
    assert mc[0]["loss"] == pytest.approx(ma[0]["loss"], abs=0.05) and mc[0]["loss"] != ma[0]["loss"]
    assert weights(tmp_path / "c" / "final")["model.embed_tokens.weight"].dtype == torch.float32  # the input's


def test_validation_loss_on_heldout_documents(moe, tmp_path):
    data = tmp_path / "docs.jsonl"
    src = (DATA / "decoder.py").read_text()
    with open(data, "w") as f:
        for i in range(0, len(src), 400):
            f.write(json.dumps({"text": src[i:i + 400]}) + "\n")
    train(config(moe(), tmp_path / "r", data=[str(data)], steps=4, eval_every=2, heldout_fraction=0.2, eval_blocks=2))
    rows = metrics(tmp_path / "r")
    assert ["val_loss" in r for r in rows] == [False, True, False, True]
    assert 0 < rows[1]["val_loss"] < 20


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(moe, tmp_path, monkeypatch):
    """A loss that turns NaN at step 3 stops the run with one clear message; checkpoint-2 stays, usable."""
    import upcycle.train.losses as losses

    real = losses.router_losses
    calls = {"n": 0}

    def poisoned(layers, records):
        # the forward's own call (live logits), not the router-gradient split's recomputation on detached copies
        calls["n"] += any(r.logits is not None and r.logits.grad_fn is not None for r in records.values())
        aux, z = real(layers, records)
        return (aux * float("nan"), z) if calls["n"] == 3 else (aux, z)

    monkeypatch.setattr(losses, "router_losses", poisoned)
    run = tmp_path / "r"
    with pytest.raises(TrainingError, match=r"the loss is nan at step 3; training stopped, the last good checkpoint "
                                            r"is .*checkpoint-2 \(try a lower --lr"):
        train(config(moe(), run, steps=5, save_every=2))
    assert [s for s, _ in ck.checkpoints(run)] == [2] and not (run / "final").exists()
    assert [r["step"] for r in metrics(run)] == [1, 2]  # nothing non-finite is logged
    assert not list(run.glob(".*.partial"))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "checkpoint-2")


def test_diverging_lr_stops_with_a_clear_message(moe, tmp_path):
    """A real divergence (no injection): --lr 1e30 blows the weights up after the first step."""
    run = tmp_path / "r"
    with pytest.raises(TrainingError, match=r"is (nan|inf|-inf) at step \d+; training stopped, the last good "
                                            r"checkpoint is .*checkpoint-1"):
        train(config(moe(), run, steps=5, save_every=1, lr=1e30))
    assert [s for s, _ in ck.checkpoints(run)] == [1]


def _no_renorm(folder: Path) -> Path:
    """qwen2_moe with norm_topk_prob false: the routing weights reach the output, so the LM loss reaches the router
    (not exact at the start; only the gradient matters here)."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg["norm_topk_prob"] = False
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_router_gradient_split_is_exact(moe, tmp_path):
    """With one MoE layer (nothing after it sends router losses back through the hidden states) the LM part of
    the router gradient is exactly the router gradient of the same step trained without router losses, and the
    router-loss part of that run is 0."""
    import shutil

    src = tmp_path / "m"
    shutil.copytree(moe("qwen2_moe", moe_layers="1"), src)
    _no_renorm(src)
    train(config(src, tmp_path / "a", steps=2))
    train(config(src, tmp_path / "b", steps=2, aux_loss_coef=0.0, z_loss_coef=0.0))
    a, b = metrics(tmp_path / "a")[0], metrics(tmp_path / "b")[0]
    assert a["router_grad_norm_aux"] > 1e-4 and b["router_grad_norm_aux"] == 0.0
    assert a["router_grad_norm_lm"] == pytest.approx(b["router_grad_norm"], rel=1e-5)
    assert b["router_grad_norm_lm"] == pytest.approx(b["router_grad_norm"], rel=1e-12)
    assert b["router_grad_lm_share"] == 1.0 and 0.5 < a["router_grad_lm_share"] < 1.0
    # the parts cannot add to more than the whole's norm allows
    assert a["router_grad_norm"] <= a["router_grad_norm_lm"] + a["router_grad_norm_aux"] + 1e-9
    assert a["router_grad_norm"] < a["grad_norm"]


def test_router_gradient_split_takes_each_routers_own_losses_only(moe, tmp_path):
    """With several MoE layers the router-loss part of a router's gradient is its own layer's losses, through its
    own matmul only: checked against the logits recomputed from the router's recorded input (another way to cut
    the graph), and shown to differ from the router loss's total derivative, which also flows through later layers'
    hidden states (the part the split counts as LM, and a second backward through every block)."""
    import shutil

    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from upcycle.families.moe.routing import RoutingRecorder, moe_layers
    from upcycle.train.losses import RouterGradients, router_losses
    from upcycle.train.router import RouterControls, RouterPatch

    src = tmp_path / "m"
    shutil.copytree(moe("qwen2_moe"), src)
    _no_renorm(src)  # the routing weights reach the output, so later layers depend on earlier routers
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, experts_implementation="eager").train()
    layers = moe_layers(model)
    assert len(layers) >= 2
    RouterPatch(layers, RouterControls())
    inputs = {}
    for m in layers:
        m.router.register_forward_pre_hook(lambda mod, args, i=m.index: inputs.__setitem__(i, args[0]))

    def loss_of(records):
        aux, z = router_losses(layers, records)
        return 0.01 * aux + 0.001 * z

    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with RoutingRecorder(model, detach=False, layers=layers) as rec:
        model(input_ids=ids, use_cache=False)
        records = rec.drain()
    split = RouterGradients(layers)
    split.add(records, loss_of)
    for j, m in enumerate(layers):
        W = m.router.weight
        x = inputs[m.index].detach().reshape(-1, m.hidden_size).float()
        cut = {i: type(r)(r.layer, r.indices, logits=r.logits.detach()) for i, r in records.items()}
        cut[m.index].logits = F.linear(x, W.float())
        (own,) = torch.autograd.grad(loss_of(cut), W)
        assert torch.allclose(split.direct[j].float(), own, rtol=1e-5, atol=1e-9), m.index
        (whole,) = torch.autograd.grad(loss_of(records), W, retain_graph=True)
        if j < len(layers) - 1:  # an earlier router also feeds the later layers' router losses
            assert not torch.allclose(whole, own, rtol=1e-3, atol=0), m.index


def test_router_gradient_split_leaves_the_step_unchanged(moe, tmp_path, monkeypatch):
    """The extra autograd calls change nothing: losses, gradient norms and final weights are bit-identical to a run
    without them (jitter on, so the random stream must be untouched too; gradient checkpointing too)."""
    import upcycle.train.losses as losses

    for ckpt in (False, True):
        kw = dict(steps=3, router_jitter=0.01, gradient_checkpointing=ckpt)
        train(config(moe(), tmp_path / f"with{ckpt}", **kw))
        with monkeypatch.context() as mp:
            mp.setattr(losses.RouterGradients, "add", lambda self, records, loss: None)
            train(config(moe(), tmp_path / f"without{ckpt}", **kw))
        mw, mo = metrics(tmp_path / f"with{ckpt}"), metrics(tmp_path / f"without{ckpt}")
        for key in ("loss", "aux_loss", "z_loss", "grad_norm", "router_grad_norm"):
            assert [r[key] for r in mw] == [r[key] for r in mo], key
        assert mw[0]["router_grad_norm_aux"] > 0 and mo[0]["router_grad_norm_aux"] == 0
        ww, wo = weights(tmp_path / f"with{ckpt}" / "final"), weights(tmp_path / f"without{ckpt}" / "final")
        assert all(torch.equal(ww[k], wo[k]) for k in ww)
    # with and without checkpointing the split agrees
    a, b = metrics(tmp_path / "withFalse"), metrics(tmp_path / "withTrue")
    assert [r["router_grad_norm_aux"] for r in a] == pytest.approx([r["router_grad_norm_aux"] for r in b], rel=1e-5)


def test_dead_router_warning(moe, tmp_path, monkeypatch):
    """Mixtral's renormalised top-2 over identical copies with a small random router (the old default): the LM loss
    sends the routers no gradient at step 1, and the tiny routers stay near uniform; the progress display says so
    once, with what to do. The default k-means router prefers experts from the start: no warning."""
    from upcycle.core.events import Events

    said: list[str] = []

    class Warnings(Events):
        def warn(self, message: str) -> None:
            said.append(message)

    train(config(moe(router_init="random"), tmp_path / "r", steps=3), events=Warnings())
    rows = metrics(tmp_path / "r")
    assert rows[0]["router_grad_lm_share"] < 1e-4  # copies + renormalisation: ~0 (rounding only)
    assert len(said) == 1
    assert "near uniform after 3 steps" in said[0] and "--expert-init noise:STD or a small drop:R" in said[0]
    assert "k-means router" in said[0] and "--router-init kmeans:TEXT" in said[0]
    said.clear()
    train(config(moe(), tmp_path / "kmeans", steps=3), events=Warnings())
    assert said == [], said
    # frozen routers: no router gradient to split; then the check itself
    said.clear()
    train(config(moe(), tmp_path / "frozen", steps=2, train=["experts"]))
    assert "router_grad_norm" not in metrics(tmp_path / "frozen")[0]
    from upcycle.train.losses import dead_router_warning

    alive = {"step": 30, "router_entropy": 1.0, "router_entropy_max": 2.0794, "router_grad_lm_share": 0.4,
             "router_grad_norm_lm": 1e-2}
    assert dead_router_warning([alive]) is None
    assert "almost no gradient" in dead_router_warning([{**alive, "router_grad_lm_share": 1e-6}])
    assert "near uniform" in dead_router_warning([{**alive, "router_entropy": 2.07}])
    assert dead_router_warning([{"step": 3, "loss": 1.0}]) is None  # dense: nothing to say


def test_training_keeps_no_map_of_the_checkpoint_and_no_gradient_pool(moe, tmp_path):
    """Memory a run would otherwise carry: the checkpoint's memory map (its expert pages are stale once loading has
    fused them) and, after the run, the upcycle kernel's recycled gradient buffers."""
    import gc
    import sys

    from upcycle.core import kernels
    from upcycle.train.model import load_for_training

    folder = moe()
    model = load_for_training(str(folder), experts_impl="eager", allow_pickle=False)
    if sys.platform.startswith("linux"):
        maps = Path("/proc/self/maps").read_text()
        assert str(folder.resolve()) not in maps and str(folder) not in maps
    del model
    gc.collect()
    train(config(folder, tmp_path / "r", experts_impl="upcycle", grad_accum=2))
    assert not kernels._POOL
