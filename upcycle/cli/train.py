"""`upcycle train`: options only; upcycle.train.train() does the work.

Each parameter is named after its TrainConfig field, so the config is built from the parsed options as they
are: an option is one field in TrainConfig plus one parameter here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from upcycle.cli.options import (
    opt as _opt,
    DATA,
    HARDWARE,
    OPTIMISATION,
    AllowPickle,
    Data,
    HeldoutFraction,
    Lr,
    Precision,
    Seed,
    SeqLen,
    TextField,
)

BUDGET = "Budget"
ROUTING = "Routing"
WHAT_TRAINS = "What trains"
CHECKPOINTS = "Output and checkpoints"


def train_command(
    model: Annotated[str, typer.Argument(help="What to train: an MoE folder written by upcycle convert (mixtral, qwen2_moe, qwen3_moe, glm4_moe, dots1, granitemoe(shared), flex_olmo) or a dense parent (folder or .gguf) for the baseline.")],
    # budget
    steps: Annotated[Optional[int], _opt("--steps", panel=BUDGET, help="Budget in optimizer steps (give this or --tokens).")] = None,
    tokens: Annotated[Optional[str], _opt("--tokens", panel=BUDGET, help="Budget in training tokens, e.g. 20M or 1.5B (rounded up to whole steps); the same budget makes a fair dense baseline.")] = None,
    batch_size: Annotated[int, _opt("--batch-size", "-b", panel=BUDGET, help="Blocks per micro-batch per process.")] = 8,
    grad_accum: Annotated[int, _opt("--grad-accum", panel=BUDGET, help="Micro-batches per optimizer step (tokens per step = seq-len x batch-size x grad-accum x processes).")] = 1,
    # data
    data: Data = ...,
    seq_len: SeqLen = 1024,
    text_field: TextField = None,
    heldout_fraction: HeldoutFraction = 0.01,
    eval_every: Annotated[Optional[int], _opt("--eval-every", panel=DATA, help="Validation loss on held-out blocks every N steps (default: at each checkpoint, if the held-out split has a block; 0: never).")] = None,
    eval_blocks: Annotated[int, _opt("--eval-blocks", panel=DATA, help="Held-out blocks per validation.")] = 16,
    # optimisation
    lr: Lr = 1e-4,
    min_lr_ratio: Annotated[float, _opt("--min-lr-ratio", panel=OPTIMISATION, help="Learning rate at the last step, as a fraction of --lr.")] = 0.1,
    warmup_steps: Annotated[Optional[int], _opt("--warmup-steps", panel=OPTIMISATION, help="Linear warmup steps (default: 2% of the steps).")] = None,
    weight_decay: Annotated[float, _opt("--weight-decay", panel=OPTIMISATION, help="AdamW weight decay on matrices (not on norms and biases).")] = 0.1,
    grad_clip: Annotated[float, _opt("--grad-clip", panel=OPTIMISATION, help="Clip the global gradient norm to this (0: no clipping).")] = 1.0,
    # routing
    aux_loss_coef: Annotated[float, _opt("--aux-loss-coef", panel=ROUTING, help="Switch load-balancing loss weight (0: off). The loss is 1 at perfect balance.")] = 0.01,
    z_loss_coef: Annotated[float, _opt("--z-loss-coef", panel=ROUTING, help="Router z-loss weight, mean logsumexp(logits)^2 (0: off).")] = 1e-3,
    router_jitter: Annotated[float, _opt("--router-jitter", panel=ROUTING, help="Multiplicative noise 1 +- J on the router input while training (0: off; Switch used 0.01).")] = 0.0,
    capacity_factor: Annotated[Optional[float], _opt("--capacity-factor", panel=ROUTING, help="Cap each expert at ceil(C x tokens x k / experts) assignments per micro-batch and drop the overflow (first choices first). Default: dropless.")] = None,
    aux_free_bias: Annotated[bool, _opt("--aux-free-bias/--no-aux-free-bias", panel=ROUTING, help="Aux-loss-free balancing (DeepSeek-V3): move each expert's selection bias by +-rate per step towards equal load. glm4_moe and dots1 only (they store the bias).")] = False,
    bias_update_rate: Annotated[float, _opt("--bias-update-rate", panel=ROUTING, help="Step of --aux-free-bias per optimizer step.")] = 1e-3,
    router_lr_mult: Annotated[float, _opt("--router-lr-mult", panel=ROUTING, help="Router learning rate = --lr x this.")] = 1.0,
    mlp_lr_mult: Annotated[float, _opt("--mlp-lr-mult", "--expert-lr-mult", panel=OPTIMISATION, help="The MLP's learning rate = --lr x this, on both sides: an MoE's routed experts (and shared experts, and MLP layers left dense), a dense model's MLP, so `upcycle train PARENT` with the MoE's options is the fair baseline. Default 0.5, from docs/study.md: with it the k-means MoE came out level with, then ahead of, its parent trained the same way (-0.0019 nats at 147K tokens, two seeds pooled; over blocks of only 8 documents, so not yet a verdict by upcycle eval's rule), and 0.5 lowered both sides' held-out loss; at 1.0 the MoE was 0.008-0.010 behind. --expert-lr-mult is its old name.")] = 0.5,
    force_route: Annotated[Optional[str], _opt("--force-route", panel=ROUTING, help="Send every training token to these experts (3: expert 3 of every MoE layer; 0=3;1=5: per layer; or a domain_experts.json), filling the top-k with them; fewer than k leave the rest to the router's best others. Weights by the router's own rule. Validation and the saved model route normally.")] = None,
    route_target: Annotated[Optional[str], _opt("--route-target", panel=ROUTING, help="Steer the router: add a cross-entropy of its distribution toward these experts (same grammar as --force-route) on the run's data. Needs a trained router (--train router or --lora router).")] = None,
    route_target_coef: Annotated[float, _opt("--route-target-coef", panel=ROUTING, help="Weight of the --route-target loss.")] = 1.0,
    # what trains
    train: Annotated[Optional[List[str]], _opt("--train", panel=WHAT_TRAINS, help="What trains fully (repeatable; default all, with --lora only what is named here): router, experts, shared, attention, embeddings, norms, dense_mlp; experts:0-3 (those experts of every MoE layer), experts:0=1,2;5=0-3 (per layer), or a domain_experts.json from upcycle eval --domain.")] = None,
    lora: Annotated[Optional[List[str]], _opt("--lora", panel=WHAT_TRAINS, help="LoRA adapters (PEFT) on these groups: router, experts (the fused expert tensors, one adapter per expert), shared, attention, dense_mlp. Everything else is frozen unless --train names it. Writes RUN/adapter/ and a merged final/.")] = None,
    lora_rank: Annotated[int, _opt("--lora-rank", panel=WHAT_TRAINS, help="LoRA rank R.")] = 8,
    lora_alpha: Annotated[float, _opt("--lora-alpha", panel=WHAT_TRAINS, help="LoRA alpha A: the update is (A / R) x B A.")] = 16.0,
    # output and checkpoints
    out: Annotated[Path, _opt("--out", "-o", panel=CHECKPOINTS, help="Run folder: metrics.jsonl, checkpoint-STEP/ and final/ (Hugging Face model folders). Must be new or empty unless --resume.")] = ...,
    save_every: Annotated[int, _opt("--save-every", panel=CHECKPOINTS, help="Write checkpoint-STEP every N steps (0: only final/).")] = 500,
    keep_checkpoints: Annotated[int, _opt("--keep-checkpoints", panel=CHECKPOINTS, help="Keep only the N newest checkpoints (0: all).")] = 0,
    resume: Annotated[bool, _opt("--resume", panel=CHECKPOINTS, help="Continue the run in --out from its newest checkpoint, exactly (same data order, RNG, optimizer).")] = False,
    save_dtype: Annotated[str, _opt("--save-dtype", panel=CHECKPOINTS, help="dtype of final/: auto (the input's), float32, bfloat16, float16. Checkpoints stay fp32 so --resume is exact.")] = "auto",
    dry_run: Annotated[bool, _opt("--dry-run", panel=CHECKPOINTS, help="Print the memory estimate and the trainable parameters per group; load no weights, write nothing.")] = False,
    report_to: Annotated[str, _opt("--report-to", panel=CHECKPOINTS, help="Tracker through accelerate: none, tensorboard or wandb (must be installed).")] = "none",
    # hardware and numerics
    precision: Precision = "auto",
    gradient_checkpointing: Annotated[bool, _opt("--gradient-checkpointing/--no-gradient-checkpointing", panel=HARDWARE, help="Recompute activations in backward: less memory, about a third more compute.")] = False,
    experts_impl: Annotated[str, _opt("--experts-impl", panel=HARDWARE, help="Experts kernel: auto (upcycle's when available, else grouped_mm), upcycle, grouped_mm, batched_mm or eager.")] = "auto",
    # common
    seed: Seed = 0,
    allow_pickle: AllowPickle = False,
) -> None:
    """Continued pretraining of an upcycled MoE (or of the dense parent, for a fair baseline).

    Runs on one process as is, or on several processes, GPUs or nodes with the
    same options under `accelerate launch -m upcycle train ...` (DDP, FSDP:
    see examples/accelerate/).

    Examples:

    Train the MoE on 20M tokens:
      upcycle train ./smol-moe -d corpus/ -o runs/moe --tokens 20M -b 8

    The dense baseline: the same options (then upcycle eval runs/moe
    --baseline runs/dense checks that they were):
      upcycle train ./SmolLM2-135M -d corpus/ -o runs/dense --tokens 20M -b 8

    After an interruption:
      upcycle train ./smol-moe -d corpus/ -o runs/moe --tokens 20M --resume

    Train only the routers, faster:
      upcycle train ./smol-moe -d code/ -o runs/code --steps 500 \\
        --train router --router-lr-mult 10

    Fine-tune expert 3 on a domain, then steer the router to it:
      upcycle train ./smol-moe -d code/ -o runs/e3 --steps 200 \\
        --force-route 3 --train experts:3
      upcycle train runs/e3/final -d code/ -o runs/r3 --steps 100 \\
        --train router --route-target 3

    LoRA on the experts, full router:
      upcycle train ./smol-moe -d code/ -o runs/lora --steps 200 \\
        --lora experts --lora-rank 16 --train router

    Several GPUs (DDP):
      accelerate launch --config_file examples/accelerate/ddp_gpu.yaml \\
        -m upcycle train ./smol-moe -d corpus/ -o runs/moe --tokens 1B
    """
    options = dict(locals())
    from upcycle.train import TrainConfig
    from upcycle.train import train as run_training

    from upcycle.cli.show import events, show

    config = TrainConfig(**options)  # checks itself before anything is loaded
    result = run_training(config, events=events())
    if _is_main_process():
        show(result)


def _is_main_process() -> bool:
    """Under `accelerate launch` only rank 0 shows the result (every rank returns one)."""
    import os

    return os.environ.get("RANK", "0") == "0"
