"""Which MLP neurons matter most: the score convert uses to choose a partition's shared neurons and eval uses to
choose the neurons of its equal-cost dense reference.

A neuron's use is its mean |activation| over the tokens of a sample (the activation being what down_proj
multiplies: act(gate x) * up x) times the norm of its down_proj column: the typical size of what it adds to the
MLP's output.
"""

from __future__ import annotations

import numpy as np


def neuron_use(mean_abs_activation: np.ndarray, down: np.ndarray) -> np.ndarray:
    """(I,) use of each neuron from its mean |activation| (I,) on the sample and down_proj (H, I)."""
    # in the dtype given: convert's float32 ranking stays what it was
    return np.asarray(mean_abs_activation) * np.linalg.norm(np.asarray(down), axis=0)


def most_used(use: np.ndarray, count: int) -> np.ndarray:
    """The `count` neurons of largest use, ascending by index (ties go to the lower index)."""
    return np.sort(np.argsort(-np.asarray(use), kind="stable")[:count]).astype(np.int64)
