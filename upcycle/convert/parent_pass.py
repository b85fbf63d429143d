"""The dense parent run one decoder layer at a time, weights read from its checkpoint and freed after use.

Shared by the verification (the parent MLP's input and output at every MoE layer, in float64), the k-means and
prompts router inits (hidden states to cluster) and the end-to-end measurement of mixed experts. Only one
layer's weights are ever in memory, so a parent of any size runs in about one layer of memory.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from upcycle.core.tensors import from_f32, to_f32

# The verification prompts: real text of several kinds (prose, code, facts).
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "In 1905, Albert Einstein published four papers that",
    "Mixture-of-experts models route each token to a few experts, which",
)


def f64(raw: np.ndarray, code: str):
    """A fresh, writable float64 torch tensor of stored values (exact: every storage type widens exactly)."""
    import torch

    half = {"BF16": torch.bfloat16, "F16": torch.float16}.get(code)
    if half is None or raw.dtype.itemsize != 2:
        return torch.from_numpy(to_f32(raw, code).astype(np.float64))
    # torch widens 16-bit floats in one multi-threaded pass, about twice as fast as numpy's bit shift then astype;
    # the source may be a read-only file map, which torch only reads here (.to copies)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        bits = torch.from_numpy(np.ascontiguousarray(raw).view(np.int16))
    return bits.view(half).to(torch.float64)


def read_rows(source, name: str, lo: int, hi: int) -> np.ndarray:
    """Rows lo:hi of a tensor (leading dimension), read alone when the file allows it."""
    meta = source.meta(name)
    where = source.byte_range(name)
    if where is None:
        return np.ascontiguousarray(source.read(name)[lo:hi])
    path, start, length = where
    row = length // meta.shape[0]
    from upcycle.core.tensors import STORAGE

    buf = np.empty((hi - lo) * row, dtype=np.uint8)
    with open(path, "rb") as f:
        f.seek(start + lo * row)
        f.readinto(memoryview(buf))
    return buf.view(STORAGE[meta.dtype]).reshape((hi - lo, *meta.shape[1:]))


# ------------------------------------------------------------------------------------------------ the parent, one layer at a time

def _parent_config(spec):
    from transformers import AutoConfig

    cfg = {k: v for k, v in spec.raw.items() if k not in ("model_type", "architectures", "transformers_version")}
    return AutoConfig.for_model(spec.model_type, **cfg)


class _Stop(Exception):
    """Raised inside stream_parent's hooks to end the run early (asked to stop, or nothing more is needed)."""


def stream_parent(ckpt, ids, round_code: str | None, on_mlp: Callable[[int, object, object], None], *,
                  dtype=None, source=None, replace_mlp: Callable | None = None, replace_layers=None,
                  final_norm: bool = False, stop: Callable[[], bool] | None = None, attention: str = "eager"):
    """Run token ids ([T] or [B, T]) through the parent, loading one decoder layer at a time (float64 by default);
    return the last hidden states ([B*T, H], after the final norm when final_norm), or None when stop() ended it.

    Rows of a batch may be right-padded: causal attention never lets a token see the padding after it.
    on_mlp(layer, x, y) gets each layer's MLP input and output ([B*T, H]) after the layer's weights were
    freed. round_code: round every parent weight through this storage type first (the output is narrower).
    source: read the weights from this TensorSource instead of the parent's (e.g. the mean of several
    checkpoints). replace_mlp(layer, x) -> y: run this instead of the MLP of the layers in replace_layers (all
    layers when None); their MLP weights are then not read.
    stop(): checked before each layer is loaded; True ends the run there (quietly).
    attention: transformers' attention implementation ("eager" computes softmax(QK^T)V as written, in `dtype`;
    "sdpa" is torch's fused kernel, faster in float32 where only directions are wanted, as for the k-means router).
    """
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float64
    config = _parent_config(ckpt.spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    base = model.model
    source = source if source is not None else ckpt.source

    def tensor(name: str):
        meta = source.meta(name)
        raw = source.read(name)
        if round_code is not None:
            return f64(from_f32(to_f32(raw, meta.dtype), round_code), round_code).to(dtype)
        if dtype == torch.bfloat16 and meta.dtype == "BF16":  # the stored bits as they are
            return torch.from_numpy(np.require(raw, np.uint16, ["C", "W"])).view(torch.bfloat16)
        if dtype in (torch.float32, torch.bfloat16) and meta.dtype in ("F32", "BF16", "F16"):
            # widened once, not through float64; a copy only where needed: F32 is read-only file memory,
            # BF16/F16 widen into a fresh array already
            return torch.from_numpy(np.require(to_f32(raw, meta.dtype), np.float32, ["C", "W"])).to(dtype)
        return f64(raw, meta.dtype).to(dtype)

    if final_norm:
        base.norm.load_state_dict({k: tensor(f"model.norm.{k}") for k in base.norm.state_dict()}, assign=True)
    else:
        base.norm = nn.Identity()  # the final norm and head are not needed: nothing reads them here
    base.rotary_emb = type(base.rotary_emb)(config=base.config)  # its buffers are computed, not loaded

    emb_name = "model.embed_tokens.weight"
    ids = np.asarray(ids).reshape(-1, np.asarray(ids).shape[-1])
    uniq, inverse = np.unique(ids, return_inverse=True)
    if source.byte_range(emb_name) is None:  # a GGUF or averaged table is computed whole: once, not once per token
        rows = np.ascontiguousarray(source.read(emb_name)[uniq])
    else:
        rows = np.stack([read_rows(source, emb_name, int(t), int(t) + 1)[0] for t in uniq])
    code = source.meta(emb_name).dtype
    table = f64(from_f32(to_f32(rows, code), round_code), round_code) if round_code else f64(rows, code)
    embeds = table.to(dtype)[torch.from_numpy(inverse.reshape(ids.shape))]

    captured: dict = {}

    class Replaced(nn.Module):
        def __init__(self, index: int):
            super().__init__()
            self.index = index

        def forward(self, x):
            return replace_mlp(self.index, x.reshape(-1, x.shape[-1])).reshape(x.shape)

    def hooks(i: int, layer):
        def pre(mod, args, kwargs):
            if stop is not None and stop():
                raise _Stop
            state = {k: tensor(f"model.layers.{i}.{k}") for k in mod.state_dict()}
            mod.load_state_dict(state, assign=True, strict=True)

        def mlp_hook(mod, args, output):
            h = args[0].shape[-1]
            captured["x"], captured["y"] = args[0].detach().reshape(-1, h).clone(), output.detach().reshape(-1, h).clone()

        def post(mod, args, kwargs, output):
            mod.to("meta")  # frees this layer's weights before the MoE block is rebuilt
            on_mlp(i, captured.pop("x"), captured.pop("y"))

        if replace_mlp is not None and (replace_layers is None or i in replace_layers):
            layer.mlp = Replaced(i)
        layer.register_forward_pre_hook(pre, with_kwargs=True)
        layer.mlp.register_forward_hook(mlp_hook)
        layer.register_forward_hook(post, with_kwargs=True)

    for i, layer in enumerate(base.layers):
        hooks(i, layer)
    try:
        with torch.no_grad():
            out = base(inputs_embeds=embeds, use_cache=False)
    except _Stop:
        return None
    hidden = out.last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])


def encode(spec, text: str) -> np.ndarray:
    """Token ids of `text` by the tokenizer of `spec` (a folder, or a GGUF file).

    A folder's tokenizer.json is read with the `tokenizers` library alone (transformers' AutoTokenizer takes seconds
    to import and builds the same ids with the same special tokens); other tokenizers go through AutoTokenizer."""
    path = Path(spec) / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        try:
            return np.asarray(Tokenizer.from_file(str(path)).encode(text).ids, dtype=np.int64)
        except Exception:  # a tokenizer.json the library cannot read: let transformers try (and report)
            pass
    from upcycle.core.loading import load_tokenizer

    return np.asarray(load_tokenizer(spec)(text).input_ids, dtype=np.int64)


def prompt_ids(folder: Path) -> np.ndarray:
    """The verification prompts as token ids of the tokenizer in `folder`."""
    return encode(folder, "\n\n".join(PROMPTS))


def parent_round_code(ckpt, plan) -> str | None:
    """The output's storage type when it is narrower than the parent's (its weights are rounded through it first)."""
    from upcycle.core.tensors import itemsize

    parent_code = ckpt.source.float_dtype()
    narrower = itemsize(plan.out_dtype) < itemsize(parent_code) or {plan.out_dtype, parent_code} == {"F16", "BF16"}
    return plan.out_dtype if narrower else None


class ParentStates:
    """The parent's MLP input and output at every MoE layer, on the verification prompts (`stream_parent`).

    background=True computes them on the one thread of `executor` after the jobs queued there before (convert's
    k-means router pass, whose imports then never race these), or of an executor of its own if none is given, so that
    importing torch and transformers and running the parent's float64 layers overlap with writing the shards and
    with the byte checks (convert starts it before it writes); otherwise they are computed in the calling thread
    at the first `ready` or `get`. Either way one
    parent layer is in memory at a time, plus T x H float64 twice per MoE layer (T is about 60 tokens), which is
    small next to one layer's weights. `close()` stops the run and must be called.

    The run reads the parent's own source only (never an --expert-from checkpoint or the --average-shared mean,
    which the writer and the byte checks read in the calling thread). With experts from other checkpoints
    (`mixed`) it goes on through every layer and the final norm: `final_hidden()` then gives the parent's last
    hidden states for the end-to-end measurement (upcycle.convert.verify_mix), with `ids` and `round_code`.
    """

    def __init__(self, ckpt, plan, tokenizer_folder: Path, *, background: bool, executor=None):
        import threading

        self._ckpt, self._plan, self._folder = ckpt, plan, Path(tokenizer_folder)
        self._moe = {lay.index for lay in plan.layouts if lay.moe}
        self.mixed = plan.sources is not None and not plan.sources.all_base
        self._states: dict = {}
        self._cond = threading.Condition()
        self._started = self._finished = self._stop = False
        self._error: BaseException | None = None
        self.tokens = 0
        self.ids: np.ndarray | None = None
        self.round_code: str | None = None
        self._hidden = None  # the parent's final hidden states (mixed only)
        self.threads: int | None = None  # torch's intra-op threads before the run set them to one
        self._seen = -1  # the last layer the run finished
        self._background = background
        self._future = self._own = None
        if background:
            if executor is None:
                from concurrent.futures import ThreadPoolExecutor

                executor = self._own = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upcycle-parent-layers")
            self._started = True
            self._future = executor.submit(self._run)

    def _run(self) -> None:
        try:
            import torch

            self.threads = torch.get_num_threads()
            if self._background:
                # beside the writer and the byte checks: the operations are small (a few dozen tokens), and one
                # thread avoids the cost of waking the others for each, which dominates on a busy machine (and
                # leaves the other cores to the writer and byte checks). Run alone (a parent too large to overlap),
                # the float64 products and the weights' widening are big enough that every core helps (1B-class:
                # 10 s of the verification on one of two cores)
                torch.set_num_threads(1)
            try:
                ids = self.ids = prompt_ids(self._folder)
                self.tokens = int(ids.size)
                self.round_code = parent_round_code(self._ckpt, self._plan)
                # nothing after the last MoE layer is needed, except where the end-to-end measurement (mixed) needs
                # every layer and the final norm
                last = len(self._plan.layouts) if self.mixed else max(self._moe, default=-1)
                hidden = stream_parent(self._ckpt, ids, self.round_code, self._keep, final_norm=self.mixed,
                                       stop=lambda: self._stop or self._seen >= last)
                if self.mixed:
                    self._hidden = hidden
            finally:
                torch.set_num_threads(self.threads)
        except BaseException as exc:  # handed to the thread that asks for a state
            self._error = exc
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _keep(self, i: int, x, y) -> None:
        self._seen = i
        if i in self._moe:
            with self._cond:
                self._states[i] = (x, y)
                self._cond.notify_all()

    def _ensure_started(self) -> None:
        if not self._started:
            self._started = True
            self._run()

    def ready(self, layer: int) -> bool:
        self._ensure_started()
        return layer in self._states

    def get(self, layer: int):
        """(x, y) of `layer`, waiting for the run to reach it; raises what the run raised."""
        self._ensure_started()
        with self._cond:
            self._cond.wait_for(lambda: layer in self._states or self._finished)
            if layer in self._states:
                return self._states.pop(layer)  # each state is used once: free it with its layer
        if self._error is not None:
            raise self._error
        raise AssertionError(f"the parent run ended without the MLP states of layer {layer}")

    def final_hidden(self):
        """The parent's last hidden states after the final norm ([T, H] float64; `mixed` only), waiting for the run
        to end; raises what the run raised."""
        self._ensure_started()
        with self._cond:
            self._cond.wait_for(lambda: self._finished)
        if self._error is not None:
            raise self._error
        if self._hidden is None:
            raise AssertionError("the parent run ended without its final hidden states")
        return self._hidden

    def close(self) -> None:
        self._stop = True
        if self._future is not None:
            self._future.result()  # _run keeps its errors for get(); this only waits
        if self._own is not None:
            self._own.shutdown()
        if self.threads is not None:
            import torch

            # the run set torch's default for threads that start using torch later; this thread gets it back too
            torch.set_num_threads(self.threads)


