"""`upcycle train`: continued pretraining of an upcycled MoE (or of its dense parent, as the baseline).

Small pieces: config (options that validate themselves), router (fp32 routing, jitter, capacity, bias
balancing), losses (aux and z losses, routing statistics), freeze (what trains), checkpoint (run folder,
atomic Hugging Face checkpoints, metrics.jsonl), model (what MODEL is, loading), loop (the accelerate loop).
"""

from upcycle.train.config import TrainConfig
from upcycle.train.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
