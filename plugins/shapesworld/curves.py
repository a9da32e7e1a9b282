"""Training curves of the demo's stages, drawn from their CSV logs (``<out>/runs/<stage>/csv``) for the report."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a CI machine
import matplotlib.pyplot as plt  # noqa: E402 (the backend is chosen first)


def newest_log(run_dir: Path) -> Path | None:
    """The newest ``metrics.csv`` under ``run_dir/csv``."""
    logs = sorted((run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    return logs[-1] if logs else None


def read_series(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """Every column of a Lightning ``metrics.csv`` as ``(step, value)`` points, empty cells left out."""
    series: dict[str, list[tuple[int, float]]] = {}
    with metrics_csv.open() as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def plot_stage(run_dir: Path, out: Path, title: str) -> Path | None:
    """Losses (left) and validation figures (right) of one stage's newest run as a PNG; ``None`` without a log."""
    log = newest_log(run_dir)
    if log is None:
        return None
    series = read_series(log)
    losses = {k: v for k, v in series.items() if k.startswith("train/") and "loss" in k}
    validation = {k: v for k, v in series.items() if k.startswith("val/")}
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, group, label in ((axes[0], losses, "training losses"), (axes[1], validation, "validation")):
        for key, points in sorted(group.items()):
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 10 else None, label=key)
        ax.set_title(f"{title}: {label}")
        ax.set_xlabel("step")
        if group:
            ax.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(out, dpi=80)
    plt.close(figure)
    return out
