"""Reading a training run folder's metrics.jsonl (one JSON object per optimizer step)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from upcycle.core.errors import InputError
from upcycle.core.paths import METRICS


@dataclass
class RunLog:
    path: Path
    rows: list[dict]

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of the rows that carry `key` with a number."""
        xs, ys = [], []
        for r in self.rows:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                xs.append(r["step"])
                ys.append(float(v))
        return xs, ys

    def summary(self) -> dict:
        last = self.rows[-1]
        _, val = self.series("val_loss")
        _, loss = self.series("loss")
        tail = loss[-max(1, len(loss) // 20):]  # the last 5% of steps: one step's loss is noisy
        return {"path": str(self.path), "steps": int(last["step"]), "tokens": last.get("tokens"),
                "final_loss": sum(tail) / len(tail) if tail else None, "first_loss": loss[0] if loss else None,
                "final_val_loss": val[-1] if val else None, "best_val_loss": min(val) if val else None}


def find_metrics(path: str | Path) -> Path | None:
    p = Path(path)
    if p.is_file() and p.name.endswith(".jsonl"):
        return p
    if (p / METRICS).is_file():
        return p / METRICS
    return None


def read_run(path: str | Path) -> RunLog:
    p = Path(path)
    if not p.exists():
        raise InputError(f"--run: no such file or folder: {p}")
    metrics = find_metrics(p)
    if metrics is None:
        raise InputError(f"--run: {p} holds no {METRICS} (is it a folder written by upcycle train?)")
    rows = []
    lines = metrics.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break  # a run killed mid-write leaves a partial last line; the rest is good
            raise InputError(f"{metrics}:{n}: not a JSON object") from None
        if not isinstance(row, dict) or "step" not in row:
            raise InputError(f"{metrics}:{n}: expected a JSON object with a 'step'")
        rows.append(row)
    if not rows:
        raise InputError(f"{metrics} is empty: the run logged no steps yet")
    return RunLog(metrics, rows)
