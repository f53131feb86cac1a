"""PNG plots of training runs: what a user looks at to judge a defense.

Inputs are the per-epoch metric lines that `otcclip.train` writes
(`metrics.jsonl`), one list per run; nothing here trains or evaluates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from otcclip.atomic import atomic_path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(metrics: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    epochs, values = [], []
    for m in metrics:
        value = (m.get("eval") or {}).get(key)
        if value is not None:
            epochs.append(int(m["epoch"]))
            values.append(100.0 * float(value))
    return epochs, values


def plot_epochs(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path) -> None:
    """Targeted ASR, backdoor ASR and zero-shot top-1 per epoch, one line per run."""
    plt = _pyplot()
    panels = (
        ("targeted_asr", "targeted ASR (%)"),
        ("backdoor_asr", "backdoor ASR (%)"),
        ("zero_shot_top1", "zero-shot top-1 (%)"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        for name, metrics in runs.items():
            x, y = _series(metrics, key)
            if x:
                ax.plot(x, y, marker="o", label=name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def round_reports(metrics: Sequence[Mapping[str, Any]]) -> list[tuple[int, Mapping[str, Any]]]:
    """(epoch, matching report) for every epoch that began with a matching round."""
    out = []
    for m in metrics:
        report = m.get("defense") or {}
        if "round" in report:
            out.append((int(m["epoch"]), report))
    return out


def plot_rounds(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path) -> bool:
    """Share of poisoned and of clean pairs each matching round doubts.

    A doubted pair is re-paired, or left out of the epoch (OTCCLIP's `on_doubt="drop"`).

    Returns False (and writes nothing) when no run had a matching round.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    drawn = False
    for name, metrics in runs.items():
        rounds = round_reports(metrics)
        if not rounds:
            continue
        x = [epoch for epoch, _ in rounds]
        broken = [100.0 * float(r.get("poison_broken") or 0.0) for _, r in rounds]
        clean = [100.0 * (1.0 - float(r.get("clean_kept") or 1.0)) for _, r in rounds]
        ax.plot(x, broken, marker="o", label=f"{name}: poisoned pairs doubted")
        ax.plot(x, clean, marker="s", linestyle="--", label=f"{name}: clean pairs doubted")
        drawn = True
    if drawn:
        ax.set_xlabel("epoch (a matching round at its start)")
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.set_ylabel("% of pairs")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        _save(fig, path)
    plt.close(fig)
    return drawn


def _integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _save(fig: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
