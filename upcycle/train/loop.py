"""`train(config)`: continued pretraining of an upcycled MoE (or of its dense parent, as the baseline).

Order of work: every check that can fail on the options, the run folder, the data or the model type runs
before the weights are loaded; then one accelerate setup that is the same for one process and for
`accelerate launch` (DDP, FSDP); then the loop. Distribution is accelerate's: this module only asks it for the
rank, the no_sync context, reductions, gradient clipping, state dicts and checkpoint state.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

from upcycle.core.errors import OutputError, TrainingError
from upcycle.core.events import Events, events_or_silent
from upcycle.train import checkpoint as ck
from upcycle.train import disk
from upcycle.train.config import TrainConfig
from upcycle.train.signals import StopOnSignal, StoppedBySignal


@dataclass
class TrainPlan:
    """What --dry-run found: the memory estimate against what is available, and what would train."""

    estimate: object  # upcycle.core.memory.Estimate
    available: int
    where: str  # where the available figure comes from
    batch: str  # "B x T tokens, precision P, gradient checkpointing on|off"
    trainable: dict[str, int]  # per --train group
    total: dict[str, int]
    lora: str | None = None  # "rank R on GROUPS", when --lora

    @property
    def refused(self) -> bool:
        return self.estimate.total > self.available

    def lines(self) -> list[str]:
        from upcycle.core.tensors import human_bytes, human_count

        est, t, n = self.estimate, self.trainable, self.total
        out = [f"memory     about {human_bytes(est.total)} ({est.describe()}); {human_bytes(self.available)} "
               f"available ({self.where})",
               f"batch      {self.batch}",
               f"trainable  {human_count(sum(t.values()))} of {human_count(sum(n.values()))} parameters"]
        for role in sorted(n):
            out.append(f"  {role:<11}{human_count(t.get(role, 0)):>9} of {human_count(n[role])}")
        if "lora" in t:
            out.append(f"  {'lora':<11}{human_count(t['lora']):>9} adapter parameters at most ({self.lora})")
        if self.refused:
            out.append("would refuse: " + est.refusal(self.available, self.where))
        return out


@dataclass
class TrainResult:
    out: Path
    steps: int  # the step the run ended at
    tokens: int  # tokens trained on, in all (a resumed run counts its earlier steps too)
    final_loss: float | None
    final: Path | None
    trained_steps: int = 0  # steps taken by this call (fewer than `steps` after --resume)
    adapter: Path | None = None  # --lora: the adapter folder
    adapter_for: str | None = None  # --lora: the model it adapts
    adapter_note: str = ""  # --lora: which groups are in final/ only
    plan: TrainPlan | None = None  # --dry-run: what would run (nothing was loaded or written)


def lr_lambda(total: int, warmup: int, min_ratio: float):
    """Linear warmup to 1, then cosine from 1 down to min_ratio at the last step."""

    def f(step: int) -> float:  # step = optimizer steps already taken
        if warmup and step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup - 1)
        progress = min(1.0, (step - warmup) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _cpu_only() -> bool:
    """No GPU or other accelerator here. accelerate then needs cpu=True to run several processes started by
    `accelerate launch --multi_gpu` (torchrun) as DDP over gloo; its own MULTI_CPU launcher needs MPI."""
    import torch

    if torch.cuda.is_available():
        return False
    for name in ("xpu", "npu", "mlu"):
        mod = getattr(torch, name, None)
        if mod is not None and getattr(mod, "is_available", lambda: False)():
            return False
    mps = getattr(torch.backends, "mps", None)
    return not (mps is not None and mps.is_available())


def _check_launch_mode(lora: bool = False) -> None:
    """accelerate enables FSDP and DeepSpeed only on accelerators: with cpu=True (every CPU-only machine) it would
    silently run plain DDP on a full copy of the model in every process. Say so instead. LoRA runs save and merge
    whole adapters, which sharded parameters do not allow: refused there too."""
    import os

    from upcycle.core.errors import UsageError

    for var, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(var, "false").lower() == "true" and _cpu_only():
            raise UsageError(f"{name} needs GPUs (accelerate runs it on accelerators only); this machine has none: "
                             "use DDP instead, accelerate launch --config_file examples/accelerate/ddp_cpu.yaml")
        if os.environ.get(var, "false").lower() == "true" and lora:
            raise UsageError(f"--lora runs on one process or under DDP, not under {name}")


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    log_with = None if cfg.report_to == "none" else [cfg.report_to]
    # accelerate keeps process-wide singletons: a second train() in one process (a benchmark, a notebook) with
    # another --precision would fail with "AcceleratorState has already been initialized". Start each run from a
    # fresh AcceleratorState; PartialState (process group, rank, device) is kept.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(
        cpu=_cpu_only(),
        mixed_precision="bf16" if cfg.precision == "bf16" else "no",
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(cfg.out), logging_dir=str(cfg.out / "logs")),
    )


def _fmt_stats(row: dict) -> str:
    parts = [f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}", f"{row['tokens_per_s']:,.0f} tok/s"]
    if "load_cv" in row:
        parts += [f"aux {row['aux_loss']:.3f}", f"z {row['z_loss']:.3f}", f"imb {row['load_imbalance']:.2f}"]
    if "route_target_share" in row:
        parts.append(f"on target {row['route_target_share']:.0%}")
    if row.get("router_grad_lm_share") is not None:
        parts.append(f"router grad from LM {row['router_grad_lm_share']:.0%}")
    if "val_loss" in row:
        parts.append(f"val {row['val_loss']:.4f}")
    return "  ".join(parts)


def train(cfg: TrainConfig, *, events: Events | None = None) -> TrainResult:
    """Train as `cfg` says and return where the model went. Prints nothing: progress and warnings go to `events`
    (on the main process only), and the caller shows the result (or, for --dry-run, its plan)."""
    import os

    import torch

    from upcycle.core.data import PackedBlocks, heldout_blocks, resolve_data_files
    from upcycle.core.loading import load_tokenizer
    from upcycle.families.moe.routing import RoutingRecorder, moe_layers
    from upcycle.train.freeze import adamw, apply_selection, clear_fused_clip, clip_into_fused_adamw, param_groups
    from upcycle.train.losses import (ROUTER_CHECK_STEPS, RouterGradients, RoutingStats, dead_router_warning,
                                      route_target_loss, router_losses)
    from upcycle.train.model import classify, inspect_model, load_for_training, moe_layout, resolve_experts_impl
    from upcycle.train.router import RouterControls, RouterPatch, update_selection_bias

    # run-time notices before accelerate knows the process's rank (disk plan, resume fallback): the first process only
    notices = events_or_silent(events, quiet=os.environ.get("RANK", "0") != "0")

    def _notice(message: str, warning: bool = True) -> None:
        (notices.warn if warning else notices.info)(message)

    # ---- checks that need no weights (the options checked themselves when cfg was made)
    out = cfg.out
    if cfg.resume:  # before the checksums of a checkpoint are read
        ck.check_same_model(out, cfg.model)
    resume_dir = ck.check_run_dir(out, cfg.resume, warn=_notice)
    state = ck.read_state(resume_dir) if resume_dir is not None else None
    if state is not None:
        from upcycle.train.lora import check_resume

        check_resume(state, cfg, resume_dir)
    files = resolve_data_files(cfg.data)
    info = inspect_model(cfg.model)
    if info is not None:
        cfg.check_model(info.model_type, info.is_moe, info.has_selection_bias,
                        moe_layout(info.config) if info.is_moe else None)
    experts_impl = resolve_experts_impl(cfg.experts_impl, info.is_moe if info else False)
    _check_launch_mode(lora=bool(cfg.lora))
    if cfg.precision == "auto":
        # bf16 autocast only pays where bf16 matmuls are native; CPUs without AMX/AVX512-BF16 emulate them and
        # run several times slower than fp32 (benchmarks/bench_experts.py), so "auto" picks per device.
        import dataclasses

        from upcycle.core.hardware import default_precision

        # the caller's config keeps "auto"; this run's copy records what auto chose (run.json, accelerate)
        cfg = dataclasses.replace(cfg, precision=default_precision("cpu" if _cpu_only() else "cuda"))
    plan = _memory_check(cfg)
    if plan is not None:
        return TrainResult(out, 0, 0, None, None, plan=plan)

    accelerator = _accelerator(cfg)
    main = accelerator.is_main_process
    ev = events_or_silent(events, quiet=not main)
    world, rank = accelerator.num_processes, accelerator.process_index
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    total = cfg.total_steps(world)
    start = int(state["step"]) if state else 0
    if state and start >= total and (out / ck.FINAL).is_dir():
        raise TrainingError(f"nothing to resume: {out} already finished at step {start} of {total}; "
                            "give a larger --steps/--tokens to train further")

    tokenizer = load_tokenizer(resume_dir or cfg.model)
    blocks = PackedBlocks(tokenizer, files, seq_len=cfg.seq_len, split="train", heldout_fraction=cfg.heldout_fraction,
                          seed=cfg.seed, text_field=cfg.text_field, shuffle=True, rank=rank, world_size=world)
    if state:
        blocks.load_state_dict(state["data"])
    batches = blocks.iter_batches(cfg.batch_size)
    # Pull the first batch now: empty or too-small data fails here, before the model is loaded.
    pending = next(batches) if start < total else None
    val = None
    if cfg.eval_every != 0 and cfg.heldout_fraction > 0:
        from upcycle.core.errors import InputError

        try:
            val = heldout_blocks(tokenizer, files, seq_len=cfg.seq_len, max_blocks=cfg.eval_blocks,
                                 heldout_fraction=cfg.heldout_fraction, seed=cfg.seed, text_field=cfg.text_field)
        except InputError as exc:
            if cfg.eval_every:  # asked for explicitly: an error; by default: say so and go on
                raise InputError(f"--eval-every: {exc}") from None
            ev.warn(f"no validation loss: {exc}")
    eval_every = cfg.eval_every if cfg.eval_every is not None else (cfg.save_every or total)

    # ---- model
    model = load_for_training(str(resume_dir or cfg.model), experts_impl=experts_impl, allow_pickle=cfg.allow_pickle)
    if info is None:  # a GGUF parent: its type is known only now
        info = classify(model.config.to_dict(), cfg.model, None)
        cfg.check_model(info.model_type, info.is_moe, info.has_selection_bias)
    layers = moe_layers(model)
    if info.is_moe and not layers:
        from upcycle.core.errors import UnsupportedError

        raise UnsupportedError(f"{cfg.model}: found no MoE block in this {info.model_type} model")
    RouterPatch(layers, RouterControls(jitter=cfg.router_jitter, capacity_factor=cfg.capacity_factor,
                                       force=cfg.force_spec or None))
    hf_model, lora = model, None  # the Hugging Face model; `model` becomes its PeftModel in a LoRA run
    if cfg.lora:
        from upcycle.train.lora import apply_lora

        lora = apply_lora(hf_model, layers, cfg, resume_dir)
        model = lora.model
    plan = apply_selection(hf_model, layers, cfg.selection, adapters=lora.adapter_ids if lora else frozenset())
    if cfg.gradient_checkpointing:
        # non-reentrant: the recorded router logits keep their graph, so the aux and z losses still backpropagate
        if hasattr(hf_model, "activation_checkpointing_enable"):
            hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # pragma: no cover - transformers before the rename
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    groups = param_groups(hf_model, layers, lr=cfg.lr, weight_decay=cfg.weight_decay, router_lr_mult=cfg.router_lr_mult,
                          router_adapters=lora.router_ids if lora else frozenset(), mlp_lr_mult=cfg.mlp_lr_mult,
                          expert_adapters=lora.expert_ids if lora else frozenset())
    optimizer, optimizer_impl = adamw(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                      device=accelerator.device.type)
    warmup = cfg.warmup(total)
    schedule = lr_lambda(total, warmup, cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    sizes = disk.model_sizes(model)  # before accelerate wraps (or shards) it
    model, optimizer = accelerator.prepare(model, optimizer)
    # FSDP and DeepSpeed shard the gradients: their norm and clip stay accelerate's
    from accelerate.utils import DistributedType

    fold_clip = optimizer_impl == "fused" and accelerator.distributed_type in (
        DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    # The scheduler is stepped by hand once per optimizer step (accelerate's wrapper would step it once per
    # process); it is registered only so that save_state/load_state carry it.
    accelerator.register_for_checkpointing(scheduler)
    # Model weights live in the checkpoint's Hugging Face files; keep accelerate from writing a second copy.
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir / ck.TRAINER_DIR))
    unwrapped = accelerator.unwrap_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    src = info.folder
    final_dtype = cfg.save_dtype if cfg.save_dtype != "auto" else ck.source_dtype(info.config)
    tokens_per_step = cfg.tokens_per_step(world)
    tokens = int(state["tokens"]) if state else 0

    if main:
        from upcycle.train.provenance import data_record, start_record

        ck.remove_partials(out)
        if resume_dir is not None:
            ck.set_aside_newer(out, resume_dir)
        out.mkdir(parents=True, exist_ok=True)
        run = {"config": cfg.to_json(), "world_size": world, "model_type": info.model_type,
               "moe_layers": [m.index for m in layers], "experts_impl": experts_impl,
               "trainable": {k: int(v) for k, v in plan.counts.items()}, "total_steps": total,
               "warmup_steps": warmup, "tokens_per_step": tokens_per_step, "optimizer": f"AdamW ({optimizer_impl})",
               "parameters": {k: int(v) for k, v in plan.totals.items()},
               "start": start_record(cfg.model, cfg.allow_pickle), "data": data_record(blocks, files)}
        if lora is not None:
            run["lora"] = {**cfg.lora_json(), **lora.describe()}
        if resume_dir is not None and (out / ck.RUN_FILE).is_file():
            import json

            prev = json.loads((out / ck.RUN_FILE).read_text())
            run = {**prev, "resumes": prev.get("resumes", []) + [{"step": start, **run}]}
        ck.write_json(out / ck.RUN_FILE, run)
    from upcycle.core.integrity import recorded_bytes

    ckpt_bytes = (recorded_bytes(resume_dir) if resume_dir is not None else None) or sizes.checkpoint_estimate()
    final_bytes = sizes.final_estimate(torch.tensor([], dtype=getattr(torch, final_dtype)).element_size())
    if main:
        space = disk.plan(out, checkpoint=ckpt_bytes, measured=resume_dir is not None, final=final_bytes, start=start,
                          total=total, save_every=cfg.save_every, keep=cfg.keep_checkpoints,
                          existing=len(ck.checkpoints(out)))
        _notice(space.describe(out), warning=space.short)
    metrics = ck.MetricsLog(out / ck.METRICS, start if state else None, enabled=main)
    if main and cfg.report_to != "none":
        accelerator.init_trackers("upcycle", config={k: v for k, v in cfg.to_json().items()
                                                    if isinstance(v, (int, float, str, bool))})

    def data_state() -> dict:
        return {"step": step, "tokens": tokens, "data": blocks.state_dict(), "world_size": world,
                "model_type": info.model_type, "lora": cfg.lora_json()}

    def evaluate() -> float:
        model.eval()
        total_loss, n = 0.0, 0
        with torch.no_grad(), recorder.pause():
            for chunk in val.split(cfg.batch_size):
                chunk = chunk.to(accelerator.device)
                total_loss += float(model(input_ids=chunk, labels=chunk, use_cache=False).loss) * len(chunk)
                n += len(chunk)
        model.train()
        return total_loss / n

    def router_terms(records) -> tuple:
        """(weighted router loss, aux, z, route-target loss, on-target share) of one forward's records."""
        aux, z = router_losses(layers, records)
        target, on_target = (route_target_loss(layers, records, cfg.target_spec)
                             if cfg.route_target is not None else (torch.zeros(()), torch.zeros(())))
        router_loss = cfg.aux_loss_coef * aux + cfg.z_loss_coef * z
        if cfg.route_target is not None:
            router_loss = router_loss + cfg.route_target_coef * target.to(router_loss.device)
        return router_loss, aux, z, target, on_target

    last_good = resume_dir
    last_loss = None

    def save(final: bool = False) -> Path:
        """Write checkpoint-STEP (or final/) if the disk has room for it (the first process decides)."""
        nonlocal ckpt_bytes
        name = ck.FINAL if final else f"checkpoint-{step}"
        problem = disk.room_problem(out, name, final_bytes if final else ckpt_bytes) if main else None
        if world > 1:
            from accelerate.utils import broadcast_object_list

            problem = broadcast_object_list([problem])[0]
        try:
            if problem is not None:
                raise OutputError(problem)
            saved = ck.save_checkpoint(accelerator, model, tokenizer, out, step, data_state(), src, final=final,
                                       dtype=final_dtype if final else "float32", lora=lora)
        except OutputError as exc:
            keep = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
            raise OutputError(f"{exc}; training stopped, {keep} (free some space or pass --keep-checkpoints N, "
                              "then --resume)") from None
        if not final:
            from upcycle.core.integrity import recorded_bytes

            ckpt_bytes = recorded_bytes(saved) or ckpt_bytes
            if main:
                ck.prune(out, cfg.keep_checkpoints)
        return saved

    def any_process(flag: bool) -> bool:
        if world == 1:
            return flag
        return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum") > 0)

    step = start
    recorder = RoutingRecorder(unwrapped, detach=False, layers=layers)
    # the router gradient split needs each process's full router gradient; FSDP and DeepSpeed shard it
    split_router_grads = accelerator.distributed_type.name not in ("FSDP", "DEEPSPEED")
    recent: list[dict] = []  # the last rows, for the dead-router check
    router_checked = not layers
    stop = StopOnSignal().install()  # through final/ too: a signal then only waits for it
    try:
        with recorder, ev.task("training", total, completed=start, fields=("stats",), transient=False) as task:
            model.train()
            for step in range(start + 1, total + 1):
                t0 = time.perf_counter()
                stats = RoutingStats(layers)
                router_grads = RouterGradients(layers) if split_router_grads else None
                sums = torch.zeros(5, dtype=torch.float64, device=accelerator.device)
                for micro in range(cfg.grad_accum):
                    batch = pending if pending is not None else next(batches)
                    pending = None
                    batch = batch.to(accelerator.device)
                    sync = micro == cfg.grad_accum - 1
                    with (contextlib.nullcontext() if sync else accelerator.no_sync(model)):
                        out_ = model(input_ids=batch, labels=batch, use_cache=False)
                        records = recorder.drain()
                        router_loss, aux, z, target, on_target = router_terms(records)
                        router_loss, aux, z = (t.to(out_.loss.device) for t in (router_loss, aux, z))
                        target, on_target = target.to(out_.loss.device), on_target.to(out_.loss.device)
                        loss = out_.loss + router_loss
                        if router_grads is not None and (cfg.aux_loss_coef or cfg.z_loss_coef or cfg.route_target):
                            with recorder.pause():
                                router_grads.add(records, lambda r: router_terms(r)[0] / cfg.grad_accum)
                        with recorder.pause():  # activation checkpointing re-runs forwards in backward
                            accelerator.backward(loss / cfg.grad_accum)
                    stats.update(records)
                    # no host sync per micro-batch: the step reads losses and statistics back once, below
                    sums = sums + torch.stack([out_.loss.detach(), aux.detach(), z.detach(), target.detach(),
                                               on_target.detach()]).to(sums)
                    del out_, loss, records
                packed = accelerator.reduce(torch.cat([sums, stats.tensor().to(sums)]), reduction="sum")
                packed = packed.double().cpu()
                n = cfg.grad_accum * world
                lm, aux_v, z_v, target_v, on_target_v = (float(x) / n for x in packed[:5])
                stats.load_tensor(packed[5:])
                if not all(math.isfinite(v) for v in (lm, aux_v, z_v, target_v)):
                    bad = next(v for v in (lm, aux_v, z_v, target_v) if not math.isfinite(v))
                    _stop(f"the loss is {bad} at step {step}", last_good)
                router_row = (router_grads.summary(
                    (lambda t: accelerator.reduce(t, reduction="mean")) if world > 1 else None)
                    if router_grads is not None else {})
                if fold_clip:
                    grad_norm = float(clip_into_fused_adamw(optimizer, params, cfg.grad_clip))
                else:
                    grad_norm = float(accelerator.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
                if not math.isfinite(grad_norm):
                    _stop(f"the gradient norm is {grad_norm} at step {step}", last_good)
                lr_now = cfg.lr * schedule(step - 1)
                optimizer.step()
                if fold_clip:
                    clear_fused_clip(optimizer)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if cfg.aux_free_bias:
                    update_selection_bias(layers, stats.counts, cfg.bias_update_rate)
                dt = time.perf_counter() - t0
                tokens += tokens_per_step
                row = {"step": step, "loss": lm, "lr": lr_now, "tokens": tokens, "aux_loss": aux_v, "z_loss": z_v,
                       "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / dt, "step_time": dt}
                if cfg.router_lr_mult != 1.0:
                    row["router_lr"] = lr_now * cfg.router_lr_mult
                if cfg.mlp_lr_mult != 1.0:
                    row["mlp_lr"] = lr_now * cfg.mlp_lr_mult
                if cfg.route_target is not None:
                    row["route_target_loss"], row["route_target_share"] = target_v, on_target_v
                row.update(stats.summary())
                row.update(router_row)
                last_loss = lm
                if val is not None and eval_every and (step % eval_every == 0 or step == total):
                    row["val_loss"] = evaluate()
                metrics.write(row)
                if main:
                    if cfg.report_to != "none":
                        accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)
                    task.update(completed=step, stats=_fmt_stats(row))
                recent = (recent + [row])[-5:]
                if not router_checked and step >= min(ROUTER_CHECK_STEPS, total):
                    router_checked = True
                    warning = dead_router_warning(recent)
                    if warning:
                        ev.warn(warning)
                if cfg.save_every and step % cfg.save_every == 0:
                    last_good = save()
                if any_process(stop.requested) and step < total:
                    # the step is complete: save it unless it was just saved, then leave (no final/: not done)
                    if last_good is None or last_good.name != f"checkpoint-{step}":
                        last_good = save()
                    raise StoppedBySignal(f"stopped by {stop.name or 'a signal on another process'} after step "
                                          f"{step} of {total}; checkpoint written to {last_good} (--resume "
                                          "continues from it)", stop.signum or 15)
        final = save(final=True)
    finally:
        stop.restore()
        metrics.close()
        if cfg.report_to != "none":
            accelerator.end_training()
        if experts_impl == "upcycle":
            from upcycle.core.kernels import release_buffers

            release_buffers()  # recycled within this run only; the next run (or stage) starts without them
    adapter, also = None, ""
    if lora is not None:
        adapter = out / ck.ADAPTER_DIR
        also = (f"; the groups --train trained fully ({', '.join(sorted(cfg.selection.groups)) or 'experts:...'}) "
                "are in final/ only" if plan.counts.keys() - {"lora"} else "")
    return TrainResult(out, step, tokens, last_loss, final, trained_steps=step - start, adapter=adapter,
                       adapter_for=cfg.model if adapter else None, adapter_note=also)


def _memory_check(cfg: TrainConfig) -> TrainPlan | None:
    """Estimate memory from file headers (nothing loaded); for --dry-run return the plan (the caller stops there),
    else refuse if it cannot fit. On an accelerator the weights live in device memory, so only CPU runs are refused
    here."""
    from upcycle.core import memory
    from upcycle.train.memory import train_estimate

    est, trainable, total = train_estimate(cfg.model, cfg, precision=cfg.precision, allow_pickle=cfg.allow_pickle)
    if cfg.lora:
        import dataclasses

        from upcycle.train.lora import lora_estimate

        extra = lora_estimate(cfg.model, cfg)
        est = dataclasses.replace(est, parts=est.parts + tuple(extra))
        trainable = {**trainable, "lora": extra[0][1] // 16} if extra else trainable
    if cfg.dry_run:
        have, where = memory.available()
        return TrainPlan(est, have, where, f"{cfg.batch_size} x {cfg.seq_len} tokens, precision {cfg.precision}, "
                         f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}", trainable, total,
                         f"rank {cfg.lora_rank} on {','.join(cfg.lora)}" if cfg.lora else None)
    if _cpu_only():
        memory.require(est)
    return None


def _stop(what: str, last_good: Path | None) -> None:
    keep = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
    raise TrainingError(f"{what}; training stopped, {keep} (try a lower --lr, or --resume after fixing the cause)")
