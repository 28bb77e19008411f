"""`jaxalign plot RUN_DIR`: a PNG of a run's training and eval curves from metrics.jsonl."""

from __future__ import annotations

import os

from jaxalign.errors import JaxalignError
from jaxalign.train.metrics import read_metrics

_SKIP = {"step", "steps_per_second"}


def plot_run(run_dir: str, out: str | None = None, metrics: list[str] | None = None) -> str:
    """Write one panel per metric (train and eval/) to `out` (default RUN_DIR/curves.png);
    `metrics`: only these, in this order (an unknown name is an error listing the logged ones)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise JaxalignError("plotting needs matplotlib: pip install 'jaxalign[plot]'") from e
    if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        raise JaxalignError(f"{run_dir} has no metrics.jsonl; pass the output_dir of a training run")
    records = read_metrics(run_dir)
    series: dict[str, tuple[list, list]] = {}
    for r in records:
        for k, v in r.items():
            if k in _SKIP or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            xs, ys = series.setdefault(k, ([], []))
            xs.append(r["step"])
            ys.append(v)
    if not series:
        raise JaxalignError(f"{run_dir}/metrics.jsonl has no numeric metrics yet")
    names = sorted(series, key=lambda k: (k.startswith("eval/"), k))
    if metrics:
        missing = [m for m in metrics if m not in series]
        if missing:
            raise JaxalignError(f"{run_dir}/metrics.jsonl has no {', '.join(missing)}; logged: {', '.join(names)}")
        names = list(metrics)
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        xs, ys = series[name]
        ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
