"""Run metrics: `metrics.jsonl` (one JSON object per logged step), a console progress
line, and TensorBoard event files when tensorboard is installed. Process 0 writes."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax


def _tensorboard_writer(log_dir: str):
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        return None
    writer = EventFileWriter(log_dir)

    def write(step: int, values: dict) -> None:
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                             for k, v in values.items() if isinstance(v, (int, float))])
        writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
        writer.flush()

    return write


def read_metrics(run_dir: str) -> list[dict]:
    """All records of a run's metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLogger:
    def __init__(self, run_dir: str, total_steps: int, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.start_time = time.time()
        self.start_step = resume_step
        if not self.enabled:
            return
        self._truncate_after(resume_step)
        self.tensorboard = _tensorboard_writer(os.path.join(run_dir, "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """Drop records past `step` (left by a run killed after its last checkpoint)."""
        if not os.path.exists(self.path):
            return
        keep = [r for r in read_metrics(os.path.dirname(self.path)) if r.get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)

    def log(self, step: int, values: dict) -> None:
        """Append one record and show progress (train values: loss, learning_rate, ...)."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            self.tensorboard(step, {k: v for k, v in record.items() if k != "step"})
        self._progress(step, record)

    def _progress(self, step: int, record: dict) -> None:
        done = max(step - self.start_step, 1)
        elapsed = time.time() - self.start_time
        eta = elapsed / done * (self.total_steps - step)
        width = 20
        filled = int(width * step / max(self.total_steps, 1))
        parts = [f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{self.total_steps}"]
        for key, fmt in (("loss", "loss {:.4f}"), ("learning_rate", "lr {:.2e}"),
                         ("tokens_per_second", "{:,.0f} tok/s")):
            if key in record:
                parts.append(fmt.format(record[key]))
        parts += [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("eval/") and isinstance(v, float)]
        parts.append(f"ETA {int(eta // 60)}:{int(eta % 60):02d}")
        print(" | ".join(parts), file=sys.stderr, flush=True)


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
