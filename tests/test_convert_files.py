"""What convert writes: on-disk names, config keys for both transformers generations, shards, manifest, card,
determinism, atomicity and bounded memory."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from upcycle.convert import convert
from upcycle.storage.manifest import read_manifest
from upcycle.storage.sources import read_safetensors_header


def keys(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: (e.dtype, e.shape) for k, e in read_safetensors_header(f).items()})
    return out


@pytest.mark.parametrize("fmt,family,expect", [
    ("mixtral", "llama", ["model.layers.1.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.experts.7.w1.weight",
                          "model.layers.1.block_sparse_moe.experts.7.w2.weight", "model.layers.1.block_sparse_moe.experts.7.w3.weight"]),
    ("qwen2_moe", "llama", ["model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.7.gate_proj.weight",
                            "model.layers.1.mlp.shared_expert.down_proj.weight", "model.layers.1.mlp.shared_expert_gate.weight",
                            "model.layers.1.self_attn.q_proj.bias"]),
    ("glm4_moe", "llama", ["model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.1.mlp.experts.7.down_proj.weight",
                           "model.layers.1.mlp.shared_experts.up_proj.weight"]),
    ("granitemoeshared", "llama", ["model.layers.1.block_sparse_moe.input_linear.weight",
                                   "model.layers.1.block_sparse_moe.router.layer.weight", "model.layers.1.shared_mlp.output_linear.weight"]),
    ("qwen3_moe", "qwen3", ["model.layers.1.mlp.experts.7.up_proj.weight", "model.layers.1.self_attn.q_norm.weight"]),
    ("flex_olmo", "olmo2", ["model.layers.1.mlp.experts.7.up_proj.weight", "model.layers.1.post_feedforward_layernorm.weight"]),
])
def test_on_disk_names_are_per_expert(tiny_parent, tmp_path, fmt, family, expect):
    """Per-expert names load in transformers 4.x, 5.x and vLLM; the fused 3-D layout loads in 5.x only."""
    shared = 2 if fmt in ("qwen2_moe", "glm4_moe", "granitemoeshared") else 0
    convert(tiny_parent(family), tmp_path / "o", format=fmt, experts=8, top_k=4, granularity=2, shared_experts=shared,
            verify=False, quiet=True)
    k = keys(tmp_path / "o")
    for name in expect:
        assert name in k, name
    assert not any("gate_up_proj" in n for n in k)
    if fmt == "glm4_moe":
        assert k["model.layers.1.mlp.gate.e_score_correction_bias"][0] == "F32"


def test_config_carries_both_generations(tiny_parent, tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8}
    convert(tiny_parent("llama", rope_parameters=rope), tmp_path / "m", verify=False, quiet=True)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["rope_theta"] == 50000.0 and cfg["rope_parameters"]["rope_theta"] == 50000.0
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_scaling"]["factor"] == 8.0
    assert cfg["num_local_experts"] == 8 and cfg["num_experts_per_tok"] == 2 and cfg["model_type"] == "mixtral"
    convert(tiny_parent("qwen3"), tmp_path / "q", verify=False, quiet=True)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["num_experts"] == cfg["num_local_experts"] == 8 and cfg["norm_topk_prob"] is True
    convert(tiny_parent("llama"), tmp_path / "g", format="glm4_moe", verify=False, quiet=True)
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    assert cfg["partial_rotary_factor"] == 1.0 and cfg["rope_parameters"]["partial_rotary_factor"] == 1.0


def test_qwen2_moe_layer_types_are_explicit(tiny_parent, tmp_path):
    convert(tiny_parent("mistral", sliding_window=5), tmp_path / "m", format="qwen2_moe", verify=False, quiet=True)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["layer_types"] == ["sliding_attention", "sliding_attention"]
    assert cfg["use_sliding_window"] is True and cfg["max_window_layers"] == 0 and cfg["sliding_window"] == 5


def test_shards_and_index(tiny_parent, tmp_path):
    out = tmp_path / "m"
    convert(tiny_parent("llama"), out, max_shard_size="200KB", verify=True, quiet=True)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(e.dtype == "F32" and int(np.prod(e.shape)) * 4 for f in shards
                                                  for e in read_safetensors_header(f).values())
    for s in shards[:-1]:
        assert s.stat().st_size < 200_000 + 100_000  # a single tensor may exceed the limit, none here does by much


def test_same_command_same_bytes(tiny_parent, tmp_path):
    opts = dict(experts=8, top_k=4, granularity=2, expert_init="drop:0.5", slice_order="random", seed=7, verify=False, quiet=True)
    convert(tiny_parent("llama"), tmp_path / "a", **opts)
    convert(tiny_parent("llama"), tmp_path / "b", **opts)
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
    convert(tiny_parent("llama"), tmp_path / "c", **{**opts, "seed": 8})
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()


def test_tokenizer_and_generation_config_copied_unchanged(tiny_parent, tmp_path):
    parent = tiny_parent("llama")
    convert(parent, tmp_path / "m", verify=False, quiet=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "m" / name).read_bytes() == (parent / name).read_bytes()


def test_manifest_traces_every_expert(tiny_parent, tmp_path):
    convert(tiny_parent("llama"), tmp_path / "m", format="qwen2_moe", experts=6, top_k=3, granularity=4, shared_experts=1,
            slice_order="random", seed=1, verify=False, quiet=True)
    m = read_manifest(tmp_path / "m")
    assert m.recipe["granularity"] == 4 and m.data["virtual_group_size"] == 3 and m.data["format"] == "qwen2_moe"
    for layer in (0, 1):
        owned = sorted(m.shared_neurons(layer) + [n for e in range(3) for n in m.expert_neurons(layer, e)])
        assert owned == list(range(128))  # shared + one group of routed slices = the whole MLP, once
        assert m.expert_neurons(layer, 0) == m.expert_neurons(layer, 3)  # copies repeat the slices
        assert m.expert_down_scale(layer, 0) == 3.0
    card = (tmp_path / "m" / "README.md").read_text()
    assert "qwen2_moe" in card and "active per token" in card and "upcycle.json" in card


def test_drop_upcycling_is_labelled_and_measured(tiny_parent, tmp_path):
    res = convert(tiny_parent("llama"), tmp_path / "m", expert_init="drop:0.5", verify=True, quiet=True)
    v = res.verification
    assert v["exact_expected"] is False and v["max_abs_diff"] > 1e-3
    m = read_manifest(tmp_path / "m")
    reinit = m.expert_reinit(0, 0)
    assert len(reinit) == 64 and reinit != m.expert_reinit(0, 1)
    assert "perturbs the experts on purpose" in (tmp_path / "m" / "README.md").read_text()
    from safetensors.numpy import load_file

    w = load_file(tmp_path / "m" / "model.safetensors")
    p = load_file(tiny_parent("llama") / "model.safetensors")["model.layers.0.mlp.gate_proj.weight"]
    e0 = w["model.layers.0.block_sparse_moe.experts.0.w1.weight"]
    kept = np.setdiff1d(np.arange(128), reinit)
    assert np.array_equal(e0[kept], p[kept]) and not np.allclose(e0[reinit], p[reinit])


def test_noise_init(tiny_parent, tmp_path):
    res = convert(tiny_parent("llama"), tmp_path / "m", expert_init="noise:0.01", verify=True, quiet=True)
    assert res.verification["exact_expected"] is False and res.verification["max_abs_diff"] > 0


def test_kmeans_router_is_data_driven_and_exact(tiny_parent, tmp_path):
    import sysconfig
    from pathlib import Path

    text = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    res = convert(tiny_parent("llama"), tmp_path / "k", router_init=f"kmeans:{text}", experts=8, top_k=4, granularity=2,
                  verify=True, quiet=True)
    assert res.verification["exact_expected"] and res.verification["max_abs_diff"] < 1e-4
    from safetensors.numpy import load_file

    r = load_file(tmp_path / "k" / "model.safetensors")["model.layers.0.block_sparse_moe.gate.weight"]
    assert np.array_equal(r[0], r[1]) and not np.array_equal(r[1], r[2])  # tied within groups of 2
    # centred: no offset shared by every expert's logit (the z-loss would push on it; the softmax ignores it)
    assert np.abs(r.mean(0)).max() < 1e-6 * np.abs(r).max()
    convert(tiny_parent("llama"), tmp_path / "r", experts=8, top_k=4, granularity=2, verify=False, quiet=True)
    r2 = load_file(tmp_path / "r" / "model.safetensors")["model.layers.0.block_sparse_moe.gate.weight"]
    assert abs(float(np.linalg.norm(r, axis=1).mean()) - float(np.linalg.norm(r2, axis=1).mean())) > 1e-3


def test_spherical_kmeans_finds_separated_directions_and_is_a_fixed_point():
    """The centroid update (each cluster's sum as one one-hot product) gives the normalised mean of each cluster."""
    import torch

    from upcycle.convert.router_init import spherical_kmeans

    g = torch.Generator().manual_seed(3)
    truth = torch.nn.functional.normalize(torch.randn(4, 64, generator=g), dim=-1)
    x = truth.repeat_interleave(100, dim=0) + 0.05 * torch.randn(400, 64, generator=g)
    c = spherical_kmeans(x, 4, seed=0)
    assert torch.allclose(c.norm(dim=-1), torch.ones(4), atol=1e-6)
    assert ((truth @ c.T).max(dim=1).values > 0.99).all()  # every true direction has its centroid
    xn = torch.nn.functional.normalize(x, dim=-1)
    assign = (xn @ c.T).argmax(dim=1)
    for j in range(4):  # converged: one more update by a plain per-cluster sum changes nothing
        mean = torch.nn.functional.normalize(xn[assign == j].double().sum(0), dim=0)
        assert torch.allclose(c[j].double(), mean, atol=1e-5)


def test_kmeans_rows_are_centred_without_changing_any_routing(tiny_parent, tmp_path, monkeypatch):
    """Centring the k-means rows removes the logit offset every expert shares (what the z-loss penalises) and
    changes no token's softmax: the same probabilities for any hidden state."""
    import torch
    from safetensors.numpy import load_file

    import upcycle.convert.router_init as router_init

    rows = {}
    for centred in (False, True):
        monkeypatch.setattr(router_init, "CENTRED", centred)
        convert(tiny_parent("llama"), tmp_path / str(centred), experts=4, top_k=2, verify=False, quiet=True)
        rows[centred] = torch.from_numpy(
            load_file(tmp_path / str(centred) / "model.safetensors")["model.layers.1.block_sparse_moe.gate.weight"])
    x = torch.randn(64, rows[True].shape[1]) * 5
    raw, centred = x @ rows[False].T, x @ rows[True].T
    assert (raw.logsumexp(-1) - centred.logsumexp(-1)).abs().mean() > 0.1  # the offset is gone
    torch.testing.assert_close(raw.softmax(-1), centred.softmax(-1), rtol=1e-5, atol=1e-6)


def test_kmeans_pass_runs_a_bf16_parent_in_bf16(tiny_parent, tmp_path, monkeypatch):
    """A bf16 parent's k-means pass runs in bf16 where bf16 is native (its MLP inputs within bf16 rounding of the
    float32 pass's), and the conversion stays exact: the router only picks among identical copies."""
    import torch
    from transformers import AutoModelForCausalLM

    import upcycle.core.hardware as hardware
    from upcycle.storage.parent import open_parent
    from upcycle.convert.router_init import pass_dtype
    from upcycle.convert.parent_pass import stream_parent

    parent = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_parent("llama"), dtype=torch.bfloat16).save_pretrained(parent)
    for f in tiny_parent("llama").iterdir():
        if "token" in f.name:
            (parent / f.name).write_bytes(f.read_bytes())
    ckpt = open_parent(parent)
    try:
        monkeypatch.setattr(hardware, "bf16_is_fast", lambda device="cpu": True)
        assert pass_dtype(ckpt) == torch.bfloat16
        monkeypatch.setattr(hardware, "bf16_is_fast", lambda device="cpu": False)
        assert pass_dtype(ckpt) == torch.float32
        ids = np.arange(3, 67).reshape(2, 32)
        got = {}
        for dtype in (torch.bfloat16, torch.float32):
            got[dtype] = []
            stream_parent(ckpt, ids, None, lambda i, x, y, d=dtype: got[d].append(x.float()), dtype=dtype,
                          attention="sdpa")
            got[dtype] = torch.stack(got[dtype])
        rel = (got[torch.bfloat16] - got[torch.float32]).norm() / got[torch.float32].norm()
        assert 0 < float(rel) < 0.03  # bf16 arithmetic, not another function
    finally:
        ckpt.close()
    monkeypatch.setattr(hardware, "bf16_is_fast", lambda device="cpu": True)
    res = convert(parent, tmp_path / "k", experts=4, top_k=2, verify=True, quiet=True)
    assert res.plan.recipe.router_init_mode[0] == "kmeans" and "router init" in {**res.phases, **res.beside}
    assert res.verification["exact_expected"] and res.verification["max_rel_diff"] < 1e-9


def test_dry_run_writes_nothing(tiny_parent, tmp_path, capsys):
    import sys

    from rich.console import Console

    from upcycle.cli.convert_report import print_plan

    res = convert(tiny_parent("llama"), tmp_path / "m", dry_run=True, experts=16, top_k=4, granularity=2)
    assert not (tmp_path / "m").exists() and res.out is None and res.verification is None
    assert capsys.readouterr().out == ""  # the library prints no table; the CLI prints it from the result
    print_plan(res, Console(file=sys.stdout))
    text = capsys.readouterr().out
    assert "mixtral" in text and "active per token" in text and "16x64 top-4" in text
    assert res.plan.total_params > res.plan.active_params > 0


def test_failure_leaves_nothing_behind(tiny_parent, tmp_path, monkeypatch):
    """The disk fills up half-way: no OUT, no partial folder, one clear error."""
    import upcycle.convert.writer as writer

    calls = {"n": 0}

    def failing(real):
        def wrapped(*args):
            calls["n"] += 1
            if calls["n"] == 20:
                raise OSError(28, "No space left on device")
            return real(*args)

        return wrapped

    monkeypatch.setattr(writer, "_write_all", failing(writer._write_all))
    monkeypatch.setattr(writer, "_copy_range", failing(writer._copy_range))
    from upcycle.core.errors import OutputError

    with pytest.raises(OutputError, match="disk filled up"):
        convert(tiny_parent("llama"), tmp_path / "m", verify=False, quiet=True)
    assert calls["n"] == 20
    assert list(tmp_path.iterdir()) == []


def test_kernel_copy_and_numpy_paths_write_the_same_bytes(tiny_parent, tmp_path, monkeypatch):
    import upcycle.convert.writer as writer

    convert(tiny_parent("qwen2"), tmp_path / "a", experts=8, top_k=4, granularity=2, verify=False, quiet=True)
    monkeypatch.setattr(writer, "_copy_range", lambda *a: False)
    convert(tiny_parent("qwen2"), tmp_path / "b", experts=8, top_k=4, granularity=2, verify=False, quiet=True)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_streaming_memory_is_bounded_by_tensors_not_model(tiny_parent, tmp_path):
    """Peak Python/numpy allocation stays a few tensors, whatever the shard size and the number of experts."""
    parent = tiny_parent("llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, head_dim=64)
    largest = 1024 * 256 * 4  # one MLP matrix in fp32: 1 MiB
    peaks = {}
    for shard in ("1GB", "300KB"):
        tracemalloc.start()
        res = convert(parent, tmp_path / shard, experts=16, top_k=2, max_shard_size=shard, verify=False, quiet=True)
        peaks[shard] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    out_bytes = res.plan.output_bytes
    assert out_bytes > 100 * largest
    for shard, peak in peaks.items():
        assert peak < 8 * largest, f"{shard}: peak {peak / 2**20:.1f} MiB for {out_bytes / 2**20:.0f} MiB written"


def test_sigkill_mid_write_leaves_no_finished_looking_out(tiny_parent, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "m"
    code = f"""
import time, upcycle.convert.writer as w
real = w._write_all
def slow(fd, data):
    real(fd, data)
    open({str(tmp_path / 'started')!r}, 'w').close()
    time.sleep(60)
w._write_all = slow
w._copy_range = lambda *a: False
from upcycle.convert import convert
convert({str(tiny_parent('llama'))!r}, {str(out)!r}, verify=False, quiet=True)
"""
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    while not (tmp_path / "started").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert (tmp_path / "started").exists()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "started"]
    assert leftovers and all(name.startswith(".m.upcycle-partial-") for name in leftovers)
    convert(tiny_parent("llama"), out, verify=False, quiet=True)  # the next run clears the dead run's leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "started"]


def test_kmeans_beside_the_writer_writes_the_same_bytes(tiny_parent, tmp_path, monkeypatch):
    """The k-means pass on a thread beside the writer (router tensors written last, into their planned places) gives
    byte-identical files to the pass run before writing; an error in that thread reaches the caller and leaves no
    output behind."""
    import upcycle.convert.router_init as router_init
    from upcycle.storage.sources import SafetensorsSource

    parent = tiny_parent("llama")
    beside = convert(parent, tmp_path / "beside", experts=4, top_k=2, max_shard_size="40KB", quiet=True)
    assert "router init" in beside.beside and "router init" not in beside.phases
    monkeypatch.setattr(SafetensorsSource, "thread_safe", False)  # a source one thread at a time: before writing
    before = convert(parent, tmp_path / "before", experts=4, top_k=2, max_shard_size="40KB", quiet=True)
    assert "router init" in before.phases and not before.beside
    files = sorted(f.name for f in (tmp_path / "before").glob("model*.safetensors*"))
    assert len(files) > 2 and files == sorted(f.name for f in (tmp_path / "beside").glob("model*.safetensors*"))
    for name in files:
        assert (tmp_path / "before" / name).read_bytes() == (tmp_path / "beside" / name).read_bytes(), name
    monkeypatch.undo()

    def broken(*args, **kwargs):
        def run():
            raise RuntimeError("the k-means pass failed")
        return run

    monkeypatch.setattr(router_init, "kmeans_job", broken)
    with pytest.raises(RuntimeError, match="the k-means pass failed"):
        convert(parent, tmp_path / "broken", experts=4, top_k=2, quiet=True)
    assert not (tmp_path / "broken").exists() and not list(tmp_path.glob(".*broken*"))
