"""The bridge between a running model and the statistics: which layers are MoE (upcycle.families.moe.routing), what each
forward routed (RoutingRecorder), and optional lm-eval-harness tasks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from upcycle.core.errors import UnsupportedError
from upcycle.evaluate.cost import ExpertGroup
from upcycle.evaluate.drift import ExpertWeights
from upcycle.evaluate.routing_stats import LayerRouting, RoutingAccumulator
from upcycle.evaluate.specialise import TokenRouting


@dataclass
class MoEView:
    """What evaluation needs of one MoE layer (a thin view over upcycle.families.moe.routing.MoELayer)."""

    layer: object  # upcycle.families.moe.routing.MoELayer

    @property
    def index(self) -> int:
        return int(self.layer.index)

    @property
    def num_experts(self) -> int:
        return int(self.layer.num_experts)

    @property
    def top_k(self) -> int:
        return int(self.layer.top_k)

    @property
    def scoring(self) -> str:
        return str(self.layer.scoring)

    @property
    def group(self) -> ExpertGroup:
        ex = self.layer.experts
        per = (ex.gate_up_proj.numel() + ex.down_proj.numel()) // self.num_experts
        return ExpertGroup(self.num_experts, self.top_k, per)

    def weights(self) -> ExpertWeights:
        ex = self.layer.experts
        return ExpertWeights.from_fused(self.index, ex.gate_up_proj, ex.down_proj)


def moe_info(model) -> list[MoEView]:
    from upcycle.families.moe.routing import moe_layers

    return [MoEView(m) for m in moe_layers(model)]


class RoutingCollector:
    """Records routing during scoring and feeds the per-layer accumulators after every forward."""

    def __init__(self, model, moe: list[MoEView], token_layers: list[int], *, vocab_size: int, contexts: int,
                 seq_len: int, keep_choices: bool = False):
        self.model, self.moe, self.seq_len = model, moe, seq_len
        # keep_choices: every token's chosen experts per layer (sorted, int16), to compare with another model's
        self.choices: dict[int, list] | None = {m.index: [] for m in moe} if keep_choices else None
        self.acc = {m.index: RoutingAccumulator(m.index, m.num_experts, m.top_k, m.scoring) for m in moe}
        by_index = {m.index: m for m in moe}
        self.tokens = {i: TokenRouting(i, by_index[i].num_experts, vocab_size, by_index[i].scoring, contexts)
                       for i in token_layers}
        self._recorder = None

    def __enter__(self):
        if self.moe:
            from upcycle.families.moe.routing import RoutingRecorder

            self._recorder = RoutingRecorder(self.model, keep_logits=True)
            self._recorder.__enter__()
        return self

    def __exit__(self, *exc):
        if self._recorder is not None:
            self._recorder.__exit__(*exc)
            self._recorder = None
        self.model = None  # the collector outlives the scoring; the model must not
        return False

    def on_batch(self, start: int, ids) -> None:
        if self._recorder is None:
            return
        flat = ids.reshape(-1).cpu()
        for index, (logits, indices) in _drain(self._recorder).items():
            logits = logits.detach().float().cpu()
            indices = indices.detach().cpu()
            self.acc[index].update(indices, logits, seq_len=self.seq_len)
            if self.choices is not None:
                self.choices[index].append(indices.reshape(-1, indices.shape[-1]).sort(dim=-1).values.to(torch.int16))
            if index in self.tokens:
                self.tokens[index].update(flat, indices, logits, first_position=start * self.seq_len)

    def routing(self) -> list[LayerRouting]:
        return [self.acc[m.index].result() for m in self.moe]


def _drain(recorder) -> dict:
    """{layer index: (router logits [T, E], chosen experts [T, k])} of the forward just run; clears the recorder."""
    return {index: (rec.logits, rec.indices) for index, rec in recorder.drain().items()}


# ------------------------------------------------------------------------------------------ lm-eval-harness


def check_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UnsupportedError("--tasks needs lm-eval-harness: pip install lm-eval") from None


def run_tasks(model, tokenizer, tasks: list[str], limit: int | None, batch_size: int) -> dict:
    """lm-eval-harness tasks on an already loaded model; returns {task: {metric: value}}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit)
    out = {}
    for task, metrics in (res or {}).get("results", {}).items():
        out[task] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out
