"""The issue's bars and the verdict lines, computed from the table's numbers."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from deftable.report import _by_row, _values
from deftable.rows import ROW_KEYS
from deftable.runs import Run, _pct

# Every baseline OTCCLIP is compared with, by row key.
BASELINES = (("roclip", "RoCLIP"), ("safeclip", "SafeCLIP"), ("filter", "filter-then-train"))


def _mean(runs: Sequence[Run], key: str, metric: str) -> float | None:
    values = _values(
        [r for r in runs if r.row.key == key and r.status == "done"], lambda r: r.final.get(metric)
    )
    return statistics.fmean(values) if values else None


def bar_checks(runs: Sequence[Run], jobs: int) -> list[str]:
    """The issue's bars, computed from the table's numbers."""
    rows = {r.row.key: r.row.name for r in runs}

    def m(key: str, metric: str) -> float | None:
        return _mean(runs, key, metric)

    def missing(*keys: str) -> str | None:
        absent = [k for k in keys if k in rows and m(k, "zero_shot_top1") is None]
        not_run = [k for k in keys if k not in rows]
        if not_run:
            return f"not measured (row {', '.join(not_run)} not among the rows run)"
        if absent:
            return f"not measured (no finished run of {', '.join(repr(rows[k]) for k in absent)})"
        return None

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    def asr(key: str) -> tuple[float | None, float | None]:
        return m(key, "targeted_asr"), m(key, "backdoor_asr")

    def works(t: float, b: float) -> bool:
        return t >= 0.8 and b >= 0.8

    def stopped(t: float, b: float) -> bool:
        return t <= 0.02 and b <= 0.02

    lines = []
    asr_bars = (
        ("none", "attacks work without a defense (>= 80%)", works),
        ("none-adaptive", "the adaptive attack works without a defense (>= 80%)", works),
        ("none-varied", "the varied-copies attack works without a defense (>= 80%)", works),
        ("otcclip", "OTCCLIP ASR <= 2%", stopped),
        ("otcclip-adaptive", "OTCCLIP ASR <= 2% against the adaptive attack", stopped),
    )
    for key, label, passes in asr_bars:
        if key not in rows and key != "none" and key != "otcclip":
            continue  # the variant rows' lines only where they ran
        t, b = asr(key)
        gap = missing(key)
        if gap or t is None or b is None:
            lines.append(f"{label}: {gap or 'not measured (no ASR recorded)'}")
        else:
            # three decimals where one would print a miss as the bar itself ("2.0%: NOT met")
            digits = 3 if passes is stopped else 1
            shown = f"targeted {100 * t:.{digits}f}%, backdoor {100 * b:.{digits}f}%"
            lines.append(f"{label}: {shown}: {verdict(passes(t, b))}")
    # issue 13's bar: targeted <= 2%, backdoor within 1 point of the clean model's rate on
    # the same triggered images (the clean row is evaluated on BadNet's; the adaptive
    # backdoor and the varied-copies data carry the same patch)
    clean_backdoor = m("clean", "backdoor_asr")
    for key in ("otcclip", "otcclip-adaptive", "otcclip-varied"):
        if key not in rows:
            continue
        label = f"{rows[key]}: targeted ASR <= 2%, backdoor ASR <= the clean model's + 1 point"
        t, b = asr(key)
        gap = missing(key, "clean")
        if gap or t is None or b is None or clean_backdoor is None:
            lines.append(f"{label}: {gap or 'not measured (no ASR recorded)'}")
            continue
        ok = t <= 0.02 and b <= clean_backdoor + 0.01
        shown = f"targeted {_pct(t)}, backdoor {_pct(b)} (clean {_pct(clean_backdoor)})"
        lines.append(f"{label}: {shown}: {verdict(ok)}")
    label = "OTCCLIP zero-shot within 2 points of clean"
    gap = missing("otcclip", "clean")
    if gap:
        lines.append(f"{label}: {gap}")
    else:
        otc, clean = m("otcclip", "zero_shot_top1"), m("clean", "zero_shot_top1")
        assert otc is not None and clean is not None
        diff = 100.0 * (otc - clean)
        lines.append(
            f"{label}: {_pct(otc)} vs {_pct(clean)} ({diff:+.1f} points): {verdict(diff >= -2.0)}"
        )
    for key, name in BASELINES:
        label = f"{name} learns (zero-shot >= 60%)"
        gap = missing(key)
        if gap:
            lines.append(f"{label}: {gap}")
        else:
            zs = m(key, "zero_shot_top1")
            assert zs is not None
            lines.append(f"{label}: {_pct(zs)}: {verdict(zs >= 0.6)}")
    for peer, name in BASELINES:
        label = f"OTCCLIP vs {name} (higher zero-shot and linear probe at equal or lower ASR)"
        gap = missing("otcclip", peer)
        if gap:
            lines.append(f"{label}: {gap}")
            continue
        parts, worse = [], []
        for metric, title, higher in (
            ("zero_shot_top1", "zero-shot", True),
            ("linear_probe", "linear probe", True),
            ("targeted_asr", "targeted ASR", False),
            ("backdoor_asr", "backdoor ASR", False),
        ):
            a, b = m("otcclip", metric), m(peer, metric)
            parts.append(f"{title} {_pct(a)} vs {_pct(b)}")
            if a is None or b is None:
                worse.append(f"{title} not measured")
            elif (a < b) if higher else (a > b):
                worse.append(f"{'lower' if higher else 'higher'} {title}")
        result = "met" if not worse else f"NOT met ({', '.join(worse)})"
        lines.append(f"{label}: {', '.join(parts)}: {result}")
    groups = _by_row(runs)
    short = []
    for g in groups.values():
        failed = sum(r.status == "failed" for r in g)
        if any(r.status != "done" for r in g):
            short.append(
                f"{g[0].row.name} {sum(r.status == 'done' for r in g)}/{len(g)}"
                + (f" ({failed} failed)" if failed else "")
            )
    seeds = sorted({r.seed for r in runs})
    lines.append(
        f"{len(seeds)} seed(s) ({' '.join(map(str, seeds))}) for every row: "
        + ("all finished" if not short else "missing runs: " + "; ".join(short))
    )
    walls = [r.wall_seconds for r in runs if r.status == "done" and r.wall_seconds]
    if walls:
        total = sum(walls) / 60.0
        elapsed = total / max(1, jobs)
        if short:
            result = "not all runs finished"
        elif len(groups) < len(ROW_KEYS):
            result = f"only {len(groups)} of the {len(ROW_KEYS)} rows"
        else:
            result = verdict(elapsed <= 60.0)
        lines.append(
            f"whole table under an hour on this machine: {total:.1f} min of runs "
            f"(sum of wall times; about {elapsed:.1f} min at --jobs {jobs}): {result}"
        )
    return lines
