"""`upcycle train`: options only; the work is done by upcycle.train.train()."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def train_command(
    model: str = typer.Argument(..., help="What to train: an MoE folder written by upcycle convert (mixtral, qwen2_moe, qwen3_moe, glm4_moe, dots1, granitemoe(shared), flex_olmo) or a dense parent (folder or .gguf) for the baseline."),
    data: List[str] = typer.Option(..., "--data", "-d", help="Training text: .txt/.md/.py files (one document each), .jsonl/.json/.parquet/.csv (one document per row), folders, globs, or a hub dataset name when online. Repeat for several."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: metrics.jsonl, checkpoint-STEP/ and final/ (Hugging Face model folders). Must be new or empty unless --resume."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Budget in optimizer steps (give this or --tokens)."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Budget in training tokens, e.g. 20M or 1.5B (rounded up to whole steps); the same budget makes a fair dense baseline."),
    seq_len: int = typer.Option(1024, "--seq-len", help="Tokens per packed block (documents joined with EOS)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Blocks per micro-batch per process."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step (tokens per step = seq-len x batch-size x grad-accum x processes)."),
    lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate (AdamW), after linear warmup, then cosine decay."),
    min_lr_ratio: float = typer.Option(0.1, "--min-lr-ratio", help="Learning rate at the last step, as a fraction of --lr."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear warmup steps (default: 2% of the steps)."),
    weight_decay: float = typer.Option(0.1, "--weight-decay", help="AdamW weight decay on matrices (not on norms and biases)."),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Clip the global gradient norm to this (0: no clipping)."),
    save_every: int = typer.Option(500, "--save-every", help="Write checkpoint-STEP every N steps (0: only final/)."),
    keep_checkpoints: int = typer.Option(0, "--keep-checkpoints", help="Keep only the N newest checkpoints (0: all)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its newest checkpoint, exactly (same data order, RNG, optimizer)."),
    seed: int = typer.Option(0, "--seed", help="Seed of data order, held-out split and every random draw."),
    aux_loss_coef: float = typer.Option(0.01, "--aux-loss-coef", help="Switch load-balancing loss weight (0: off). The loss is 1 at perfect balance."),
    z_loss_coef: float = typer.Option(1e-3, "--z-loss-coef", help="Router z-loss weight, mean logsumexp(logits)^2 (0: off)."),
    router_jitter: float = typer.Option(0.0, "--router-jitter", help="Multiplicative noise 1 +- J on the router input while training (0: off; Switch used 0.01)."),
    capacity_factor: Optional[float] = typer.Option(None, "--capacity-factor", help="Cap each expert at ceil(C x tokens x k / experts) assignments per micro-batch and drop the overflow (first choices first). Default: dropless."),
    aux_free_bias: bool = typer.Option(False, "--aux-free-bias/--no-aux-free-bias", help="Aux-loss-free balancing (DeepSeek-V3): move each expert's selection bias by +-rate per step towards equal load. glm4_moe and dots1 only (they store the bias)."),
    bias_update_rate: float = typer.Option(1e-3, "--bias-update-rate", help="Step of --aux-free-bias per optimizer step."),
    train: Optional[List[str]] = typer.Option(None, "--train", help="What trains (repeatable, default all): router, experts, shared, attention, embeddings, norms, dense_mlp; experts:0-3 (those experts of every MoE layer), experts:0=1,2;5=0-3 (per layer), or a domain_experts.json from upcycle eval --domain."),
    router_lr_mult: float = typer.Option(1.0, "--router-lr-mult", help="Router learning rate = --lr x this."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 where the device runs bf16 matmuls natively: CUDA, or CPUs with AMX/AVX512-BF16; else fp32), bf16 (autocast over fp32 master weights) or fp32. Routers always compute in fp32."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in backward: less memory, about a third more compute."),
    experts_impl: str = typer.Option("auto", "--experts-impl", help="Experts kernel: auto (upcycle's when available, else grouped_mm), upcycle, grouped_mm, batched_mm or eager."),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="Field holding the text in .jsonl/.json/.parquet/.csv files (default: text)."),
    heldout_fraction: float = typer.Option(0.01, "--heldout-fraction", help="Share of documents kept apart for validation (the same rule as upcycle eval --split heldout)."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Validation loss on held-out blocks every N steps (default: at each checkpoint, if the held-out split has a block; 0: never)."),
    eval_blocks: int = typer.Option(16, "--eval-blocks", help="Held-out blocks per validation."),
    report_to: str = typer.Option("none", "--report-to", help="Tracker through accelerate: none, tensorboard or wandb (must be installed)."),
    save_dtype: str = typer.Option("auto", "--save-dtype", help="dtype of final/: auto (the input's), float32, bfloat16, float16. Checkpoints stay fp32 so --resume is exact."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow a MODEL stored as PyTorch pickle (.bin); only for files you trust."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the memory estimate and the trainable parameters per group; load no weights, write nothing."),
) -> None:
    """Continued pretraining of an upcycled MoE (or of the dense parent, for a fair baseline).

    Runs on one process as is, or on several processes, GPUs or nodes with the same options under
    `accelerate launch -m upcycle train ...` (DDP, FSDP: see examples/accelerate/).

    Examples:

      upcycle train ./smol-moe -d corpus/ -o runs/moe --tokens 20M --seq-len 1024 -b 8

      upcycle train ./SmolLM2-135M -d corpus/ -o runs/dense --tokens 20M --seq-len 1024 -b 8   # baseline

      upcycle train ./smol-moe -d corpus/ -o runs/moe --tokens 20M --resume   # after an interruption

      upcycle train ./smol-moe -d code/ -o runs/code --steps 500 --train router --router-lr-mult 10

      accelerate launch --config_file examples/accelerate/ddp_gpu.yaml -m upcycle train ./smol-moe -d corpus/ -o runs/moe --tokens 1B
    """
    from upcycle.train import TrainConfig
    from upcycle.train import train as run_training

    cfg = TrainConfig(
        model=model, data=list(data), out=out, steps=steps, tokens=tokens, seq_len=seq_len, batch_size=batch_size,
        grad_accum=grad_accum, lr=lr, min_lr_ratio=min_lr_ratio, warmup_steps=warmup_steps,
        weight_decay=weight_decay, grad_clip=grad_clip, save_every=save_every, keep_checkpoints=keep_checkpoints,
        resume=resume, seed=seed, aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef, router_jitter=router_jitter,
        capacity_factor=capacity_factor, aux_free_bias=aux_free_bias, bias_update_rate=bias_update_rate,
        router_lr_mult=router_lr_mult, train=list(train) if train else ["all"], precision=precision,
        gradient_checkpointing=gradient_checkpointing, experts_impl=experts_impl, text_field=text_field,
        heldout_fraction=heldout_fraction, eval_every=eval_every, eval_blocks=eval_blocks, report_to=report_to,
        save_dtype=save_dtype, allow_pickle=allow_pickle, dry_run=dry_run,
    )
    run_training(cfg)
