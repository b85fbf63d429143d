"""What experts learned: the tokens and contexts each expert receives, and which experts a domain leans on.

Tokens: for every (input token, expert) the number of times that token was routed to that expert. A token's
share for expert e is that count over the token's occurrences; its lift divides the share by what a token
would get on average (k x load[e]). Ranking by lift, among tokens seen at least `min_count` times, shows what
is *specific* to an expert; ranking by raw count would show the most frequent tokens for every expert.

Contexts: the positions where the router gave the expert its highest probability among the tokens that chose
it, shown with the text before (and a little after) the token.

Domain ranking: an expert's load on domain text over its load on the general text. Experts above 1 are used
more by the domain: the ones a domain fine-tune should train (upcycle train --train).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from upcycle.families.moe.routing import scoring_probs


@dataclass
class ExpertProfile:
    expert: int
    load: float
    top_tokens: list[dict] = field(default_factory=list)  # {"token", "id", "count", "share", "lift"}
    contexts: list[dict] = field(default_factory=list)  # {"text", "token", "prob"}


@dataclass
class LayerSpecialisation:
    layer: int
    experts: list[ExpertProfile]

    def to_json(self) -> dict:
        return asdict(self)


class TokenRouting:
    """Per-layer counts [vocab, E] and each expert's best contexts, accumulated batch by batch."""

    def __init__(self, layer: int, num_experts: int, vocab_size: int, scoring: str = "softmax", contexts: int = 3):
        self.layer, self.E, self.V, self.scoring, self.n_ctx = layer, num_experts, vocab_size, scoring, contexts
        self.counts = torch.zeros(vocab_size * num_experts, dtype=torch.long)
        self.occurrences = torch.zeros(vocab_size, dtype=torch.long)
        # best contexts per expert: probability and global token position (block * L + pos)
        self.best_p = torch.full((num_experts, contexts), -1.0, dtype=torch.float64)
        self.best_pos = torch.full((num_experts, contexts), -1, dtype=torch.long)

    def update(self, token_ids: torch.Tensor, indices: torch.Tensor, logits: torch.Tensor | None,
               first_position: int) -> None:
        """token_ids [T] input tokens in order; indices [T, k]; logits [T, E]; first_position: global position
        of token_ids[0] (consecutive after it)."""
        tok = token_ids.reshape(-1).long().cpu()
        idx = indices.reshape(tok.shape[0], -1).long().cpu()
        self.occurrences += torch.bincount(tok, minlength=self.V)[: self.V]
        flat = (tok[:, None] * self.E + idx).reshape(-1)
        self.counts += torch.bincount(flat, minlength=self.V * self.E)[: self.V * self.E]
        if logits is None or self.n_ctx == 0:
            return
        p = scoring_probs(logits.reshape(tok.shape[0], -1).cpu(), self.scoring).double()
        chosen = torch.zeros_like(p, dtype=torch.bool).scatter_(1, idx, True)
        score = p.masked_fill(~chosen, -1.0)  # only tokens that actually went to the expert
        n = min(self.n_ctx, score.shape[0])
        vals, pos = score.T.topk(n, dim=1)  # [E, n]
        pos = pos + first_position
        all_p = torch.cat([self.best_p, vals], 1)
        all_pos = torch.cat([self.best_pos, pos], 1)
        keep = all_p.topk(self.n_ctx, dim=1).indices
        self.best_p = all_p.gather(1, keep)
        self.best_pos = all_pos.gather(1, keep)

    def profiles(self, load: list[float], top_k: int, decode, blocks: torch.Tensor, *, top_tokens: int = 10,
                 min_count: int = 3) -> LayerSpecialisation:
        """decode(list[int]) -> str; blocks [n, L] the scored token ids (to cut contexts out of)."""
        counts = self.counts.view(self.V, self.E).double()
        occ = self.occurrences.double()
        L = blocks.shape[1]
        experts = []
        seen = occ >= min_count
        for e in range(self.E):
            prof = ExpertProfile(e, load[e])
            expected = top_k * load[e]
            share = torch.where(occ > 0, counts[:, e] / occ.clamp_min(1), torch.zeros_like(occ))
            cand = torch.nonzero(seen & (counts[:, e] > 0)).flatten().tolist()
            # rank by lift (share over the expert's average share), then by count; lift is share up to a constant
            cand.sort(key=lambda t: (-float(share[t]), -float(counts[t, e]), t))
            for t in cand[:top_tokens]:
                s = float(share[t])
                prof.top_tokens.append({"token": show(decode([t])), "id": t, "count": int(counts[t, e]),
                                        "share": s, "lift": s / expected if expected > 0 else math.inf})
            for p, gpos in zip(self.best_p[e].tolist(), self.best_pos[e].tolist()):
                if p < 0 or gpos < 0:
                    continue
                b, i = divmod(gpos, L)
                row = blocks[b].tolist()
                before = decode(row[max(0, i - 12):i])
                after = decode(row[i + 1:i + 4])
                token = decode([row[i]])
                prof.contexts.append({"text": show(before) + "[[" + show(token) + "]]" + show(after),
                                      "token": show(token), "prob": p})
            experts.append(prof)
        return LayerSpecialisation(self.layer, experts)


def show(text: str) -> str:
    """A token or snippet on one line, whitespace made visible where it would otherwise vanish."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


@dataclass
class DomainLayer:
    layer: int
    general_load: list[float]
    domain_load: list[float]
    ratio: list[float | None]  # domain load / general load (None: the expert got no general tokens)
    ranking: list[int]  # experts, most domain-specific first
    selected: list[int]

    def to_json(self) -> dict:
        return asdict(self)


def domain_ranking(layer: int, general_load: list[float], domain_load: list[float], top: int) -> DomainLayer:
    """Rank experts by domain load / general load; select the `top` first among those above 1 (the domain
    uses them more than general text does). If none is above 1 the domain routes like general text: none."""
    ratio: list[float | None] = []
    for g, d in zip(general_load, domain_load):
        ratio.append(d / g if g > 0 else (None if d == 0 else math.inf))
    def key(e):
        r = ratio[e]
        return (-(r if r is not None else 0.0), -domain_load[e], e)
    ranking = sorted(range(len(ratio)), key=key)
    selected = [e for e in ranking if ratio[e] is not None and ratio[e] > 1.0][:top]
    return DomainLayer(layer, list(general_load), list(domain_load), ratio, ranking, sorted(selected))


def experts_file(domain: list[DomainLayer]) -> dict[str, list[int]]:
    """{layer: [expert indices]} (JSON object keys are strings), the form `upcycle train --train` reads."""
    return {str(d.layer): d.selected for d in domain if d.selected}
