"""Was the dense baseline trained the same way as the MoE? The rule behind "paid off", from the two runs' run.json.

Upcycling is credited only against the dense parent trained exactly as the MoE was: `upcycle train PARENT` with
the MoE run's options. Compared (every one must be equal, and known):

- start: the baseline started from the MoE's recorded parent (its tensor digest, upcycle.json), and the MoE run
  started from the conversion itself, not from an MoE trained before (whose history the baseline lacks);
- data: the same files (the data layer's identity: names and sizes) and the same split (seed, held-out fraction,
  text field);
- budget: training tokens, sequence length, tokens per optimizer step;
- schedule: peak learning rate, warmup steps, decay length (total steps) and floor (--min-lr-ratio);
- optimizer: weight decay, gradient clipping, AdamW betas and epsilon; precision;
- the MLP's learning-rate multiplier (--mlp-lr-mult) and the parts trained, mapped across: attention, embeddings
  and norms are the same parts in both models; an MoE's routed experts, shared experts and MLP layers left dense
  are the dense model's MLP; the routers have no dense counterpart. LoRA groups, rank and alpha likewise.

A setting one run does not record (a run of an older upcycle, a baseline given as a bare model) cannot be checked,
and counts as a difference: the verdict is withheld and the report names it. Options that only an MoE has (router
losses, router learning rate) are not compared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

RUN_FILE = "run.json"
NOT_RECORDED = "not recorded"
MLP_ROLES = ("experts", "shared", "dense_mlp")
SAME_PARTS = ("attention", "embeddings", "norms")


@dataclass(frozen=True)
class Difference:
    """One setting in which the baseline was not trained as the MoE was (or cannot be shown to have been)."""

    setting: str
    model: object  # the MoE run's value; NOT_RECORDED when unknown
    baseline: object

    @property
    def unknown(self) -> bool:
        return NOT_RECORDED in (self.model, self.baseline)

    def text(self) -> str:
        return f"{self.setting}: {_show(self.model)} for the MoE, {_show(self.baseline)} for the baseline"

    def to_json(self) -> dict:
        return {"setting": self.setting, "model": self.model, "baseline": self.baseline}


def _show(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    return str(v)


def read_run_record(run_dir: Path | None) -> dict | None:
    """run.json of a run folder, with the latest resume's entries over the first start's (a resume may extend the
    budget); None when there is none or it cannot be read."""
    if run_dir is None or not (Path(run_dir) / RUN_FILE).is_file():
        return None
    try:
        rec = json.loads((Path(run_dir) / RUN_FILE).read_text())
    except json.JSONDecodeError:
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("config"), dict):
        return None
    resumes = rec.get("resumes") or []
    if resumes:
        last = {k: v for k, v in resumes[-1].items() if k != "step"}
        rec = {**rec, **last, "config": {**rec["config"], **last.get("config", {})}}
    return rec


def _is_moe(rec: dict) -> bool:
    return bool(rec.get("moe_layers"))


def mlp_lr_mult(rec: dict) -> float:
    """The MLP's multiplier a run trained with. Before --mlp-lr-mult, --expert-lr-mult scaled an MoE's routed
    experts and nothing of a dense model."""
    cfg = rec["config"]
    if "mlp_lr_mult" in cfg:
        return float(cfg["mlp_lr_mult"])
    return float(cfg.get("expert_lr_mult", 1.0) or 1.0) if _is_moe(rec) else 1.0


def _status(trained: int, total: int) -> str:
    return "frozen" if trained == 0 else "trained" if trained >= total else "partly trained"


def parts_trained(rec: dict) -> dict[str, str] | None:
    """{attention, embeddings, norms, mlp: trained / frozen / partly trained} from run.json's parameter counts;
    None for a run that does not record them (before run.json had `parameters`)."""
    totals, trained = rec.get("parameters"), rec.get("trainable") or {}
    if not isinstance(totals, dict):
        return None
    out = {part: _status(int(trained.get(part, 0)), int(totals[part])) for part in SAME_PARTS if totals.get(part)}
    mlp_total = sum(int(totals.get(r, 0)) for r in MLP_ROLES)
    if mlp_total:
        out["mlp"] = _status(sum(int(trained.get(r, 0)) for r in MLP_ROLES), mlp_total)
    return out


def lora_parts(rec: dict) -> dict | None:
    cfg = rec["config"]
    groups = cfg.get("lora") or []
    if not groups:
        return None
    mapped = sorted({"mlp" if g in MLP_ROLES else g for g in groups if g != "router"})
    return {"groups": mapped, "rank": cfg.get("lora_rank"), "alpha": cfg.get("lora_alpha")}


def _resolved_files(specs) -> list[str] | None:
    from upcycle.core.data import resolve_data_files
    from upcycle.core.errors import UpcycleError

    try:
        return sorted(str(Path(f).resolve()) for f in resolve_data_files(list(specs)))
    except (UpcycleError, OSError, TypeError):
        return None


def training_differences(moe: dict | None, base: dict | None, *, parent_digest: str | None,
                         converted_digest: str | None, model_tokens: int | None, baseline_tokens: int | None,
                         allow_pickle: bool = False) -> list[Difference]:
    """Every setting in which the baseline run `base` was not (or cannot be shown to have been) trained as the MoE
    run `moe` was (both read by read_run_record). parent_digest / converted_digest: the evaluated MoE's upcycle.json
    (the parent it was converted from; the weights convert wrote)."""
    diffs: list[Difference] = []

    def add(setting, a, b):
        if a != b or NOT_RECORDED in (a, b):
            diffs.append(Difference(setting, a, b))

    if moe is None or base is None:
        return [Difference("training run (run.json)", "its run folder" if moe else NOT_RECORDED,
                           "its run folder" if base else NOT_RECORDED)]
    mc, bc = moe["config"], base["config"]

    # where each run started
    base_start = (base.get("start") or {}).get("digest") or _digest_now(bc.get("model"), allow_pickle)
    if parent_digest is None or base_start is None:
        add("parent (tensor digest)", parent_digest or NOT_RECORDED, base_start or NOT_RECORDED)
    elif base_start != parent_digest:
        diffs.append(Difference("parent", f"{parent_digest[:12]}... (upcycle.json)",
                                f"{bc.get('model')} ({base_start[:12]}...)"))
    moe_start = (moe.get("start") or {}).get("digest") or _digest_now(mc.get("model"), allow_pickle)
    if converted_digest is not None and moe_start is not None and moe_start != converted_digest:
        diffs.append(Difference("MoE run's start", f"{mc.get('model')}, not the fresh conversion (a baseline would "
                                "need the same history)", "the dense parent"))
    elif converted_digest is None or moe_start is None:
        diffs.append(Difference("MoE run's start (tensor digest)", NOT_RECORDED, "the dense parent"))

    # data and split
    md, bd = moe.get("data") or {}, base.get("data") or {}
    if md.get("identity") and bd.get("identity"):
        add("data files (names and sizes)", f"{md.get('files')} files ({md['identity']})",
            f"{bd.get('files')} files ({bd['identity']})")
    else:
        fm, fb = _resolved_files(mc.get("data") or []), _resolved_files(bc.get("data") or [])
        add("data files", fm if fm is not None else NOT_RECORDED, fb if fb is not None else NOT_RECORDED)
    for key, name in (("seed", "seed (--seed: data order and held-out split)"),
                      ("heldout_fraction", "held-out fraction"), ("text_field", "text field")):
        add(name, mc.get(key), bc.get(key))

    # budget
    if model_tokens is not None and baseline_tokens is not None and model_tokens != baseline_tokens:
        diffs.append(Difference("training tokens", f"{model_tokens:,}", f"{baseline_tokens:,}"))
    elif model_tokens is None or baseline_tokens is None:
        add("training tokens", model_tokens if model_tokens is not None else NOT_RECORDED,
            baseline_tokens if baseline_tokens is not None else NOT_RECORDED)
    add("sequence length (--seq-len)", mc.get("seq_len"), bc.get("seq_len"))
    add("tokens per optimizer step (batch)", _tokens_per_step(moe), _tokens_per_step(base))

    # schedule, optimizer, numerics
    add("peak learning rate (--lr)", mc.get("lr"), bc.get("lr"))
    add("warmup steps", moe.get("warmup_steps", NOT_RECORDED), base.get("warmup_steps", NOT_RECORDED))
    add("decay length (total steps)", moe.get("total_steps", NOT_RECORDED), base.get("total_steps", NOT_RECORDED))
    add("learning-rate floor (--min-lr-ratio)", mc.get("min_lr_ratio"), bc.get("min_lr_ratio"))
    add("weight decay", mc.get("weight_decay"), bc.get("weight_decay"))
    add("gradient clipping", mc.get("grad_clip"), bc.get("grad_clip"))
    add("AdamW betas", mc.get("adam_betas"), bc.get("adam_betas"))
    add("AdamW epsilon", mc.get("adam_eps"), bc.get("adam_eps"))
    add("precision", mc.get("precision"), bc.get("precision"))
    add("MLP learning-rate multiplier (--mlp-lr-mult)", mlp_lr_mult(moe), mlp_lr_mult(base))

    # parts trained, mapped across
    pm, pb = parts_trained(moe), parts_trained(base)
    if pm is None or pb is None:
        add("parts trained (--train)", _train_groups(mc), _train_groups(bc))
    else:
        for part in (*SAME_PARTS, "mlp"):
            if part in pm or part in pb:
                add(f"{'MLP' if part == 'mlp' else part} (--train)", pm.get(part, "absent"), pb.get(part, "absent"))
    lm, lb = lora_parts(moe), lora_parts(base)
    if lm != lb:
        diffs.append(Difference("LoRA (--lora, --lora-rank, --lora-alpha)", lm or "none", lb or "none"))
    return diffs


def _train_groups(cfg: dict):
    """--train as the parts it names, mapped across (a run.json without `parameters`): the MLP's groups are one
    part, the routers none; "all" stays "all"."""
    groups = set()
    for value in cfg.get("train") or ["all"]:
        for name in str(value).split(","):
            name = name.strip()
            if name.startswith("experts:") or name.endswith(".json"):
                groups.add("some experts")
            elif name in MLP_ROLES:
                groups.add("mlp")
            elif name and name != "router":
                groups.add(name)
    return sorted(groups)


def _tokens_per_step(rec: dict):
    if rec.get("tokens_per_step") is not None:
        return rec["tokens_per_step"]
    cfg = rec["config"]
    try:
        return int(cfg["seq_len"]) * int(cfg["batch_size"]) * int(cfg["grad_accum"]) * int(rec.get("world_size", 1))
    except (KeyError, TypeError, ValueError):
        return NOT_RECORDED


def _digest_now(model, allow_pickle: bool) -> str | None:
    """For a run of an older upcycle (no start digest in run.json): the digest of its start model, if still there."""
    if not model or not Path(str(model)).expanduser().exists():
        return None
    from upcycle.storage.manifest import model_digest

    return model_digest(str(model), allow_pickle=allow_pickle)
