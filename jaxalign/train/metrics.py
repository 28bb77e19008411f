"""Run metrics: `metrics.jsonl` (one JSON object per logged step), a console progress
line, and TensorBoard event files when tensorboard is installed. Process 0 writes.

`metrics.jsonl` is appended to; on a resume, records past the resumed step (and a line
torn by a kill) are dropped by writing a new file and renaming it over the old one, and
TensorBoard's event files are rebuilt from the kept records, so no step appears twice."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax

from jaxalign.errors import CheckpointError


def _tensorboard_writer(log_dir: str, replace: list[dict] | None = None):
    """`write(step, values)` into a new event file, or None without tensorboard. `replace`:
    records that replace the event files already in `log_dir` (written first, then the old
    files are deleted)."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        return None
    old = []
    if replace is not None and os.path.isdir(log_dir):
        old = [os.path.join(log_dir, n) for n in os.listdir(log_dir) if n.startswith("events.out.tfevents.")]
    writer = EventFileWriter(log_dir)

    def write(step: int, values: dict) -> None:
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                             for k, v in values.items() if isinstance(v, (int, float))])
        writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
        writer.flush()

    for record in replace or []:
        write(record["step"], {k: v for k, v in record.items() if k != "step"})
    for path in old:
        os.remove(path)
    return write


def _parse(text: str, path: str) -> list[dict]:
    """Records of a metrics.jsonl text; a torn last line (a write cut short by a kill) is left out."""
    lines = text.splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise CheckpointError(f"{path} line {i + 1} is not valid JSON; fix or delete that line") from None
    return records


def read_metrics(run_dir: str) -> list[dict]:
    """All records of a run's metrics.jsonl (a torn last line left out)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path) as f:
        return _parse(f.read(), path)


class MetricsLogger:
    def __init__(self, run_dir: str, total_steps: int, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.start_time = time.time()
        self.start_step = resume_step
        if not self.enabled:
            return
        kept = self._restart_at(resume_step)
        self.tensorboard = _tensorboard_writer(os.path.join(run_dir, "tensorboard"), replace=kept)

    def _restart_at(self, step: int) -> list[dict] | None:
        """Keep the records of steps <= `step` (the resumed checkpoint; none on a fresh start)
        and drop the rest: records of a run killed after its last checkpoint, a torn last
        line. Returns the kept records if the file had to change (it is then replaced
        atomically), else None."""
        if not os.path.exists(self.path):
            return None
        with open(self.path) as f:
            text = f.read()
        keep = [r for r in _parse(text, self.path) if r.get("step", 0) <= step] if step > 0 else []
        new = "".join(json.dumps(r) + "\n" for r in keep)
        if new == text:
            return None
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return keep

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
