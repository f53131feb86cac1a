"""doubt_quality: how well each doubt signal, and the fused score, finds each attack's poisons.

The fast loop of the doubt work (issue 13): instead of the hours-long defense table,
embed a poisoned training set with saved checkpoints (the end of the warm-up, later
epochs) and measure, per attack, for every signal of `otcclip.doubt` and for the
fused score: AUROC (poisoned pairs of that attack against the clean pairs), and
recall and precision at the budget the round would use (the label-free mixture cut).
A few minutes at 20k pairs on 2 cores.

The poison manifest is read here, by the benchmark, to score the defense; the
defense itself never sees it.

    python benchmarks/doubt_quality.py --poison-dir runs/dq/a \\
        --checkpoint runs/dq/none-a/checkpoints/<step> [--checkpoint ...] [--json out.json]

Each checkpoint is a directory holding model.safetensors or the file itself.
Its last lines are the issue's bars: fused AUROC >= 0.98 for every attack that
pairs an image with a caption of other content (the label-consistent backdoor is
reported, not held to it), and recall >= 95% at the round's budget.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

AUROC_BAR = 0.98
RECALL_BAR = 0.95


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--poison-dir",
        required=True,
        type=Path,
        action="append",
        help="A directory from `otcclip poison` (repeatable, paired with --checkpoint).",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        action="append",
        help="Weights (or a checkpoint directory); repeatable.",
    )
    p.add_argument("--k", type=int, default=None, help="Neighbours (default: DoubtConfig's).")
    p.add_argument(
        "--signals", default=None, help="Comma-separated signals to fuse (default: DoubtConfig's)."
    )
    p.add_argument("--max-share", type=float, default=None, help="Budget cap.")
    p.add_argument(
        "--tail",
        type=float,
        default=None,
        help="The quantile each signal is scaled by (default: DoubtConfig's).",
    )
    p.add_argument("--threads", type=int, default=2, help="torch and rayon threads.")
    p.add_argument("--batch", type=int, default=512, help="Embedding batch size.")
    p.add_argument(
        "--fusions",
        default=None,
        help="Comma-separated fusions to compare (default: DoubtConfig's only).",
    )
    p.add_argument(
        "--budgets",
        default=None,
        help="Comma-separated budget rules to compare (cut, mixture; default: DoubtConfig's only).",
    )
    p.add_argument("--cut", type=float, default=None, help="The fused cut of budget 'cut'.")
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="Keep each checkpoint's embeddings here (npz), to rerun fusions fast.",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="Any other DoubtConfig field (repeatable), e.g. --set phase_scale=own.",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="Write every figure here too.")
    return p.parse_args(argv)


def checkpoint_weights(path: Path) -> Path:
    if path.is_dir():
        inner = path / "model.safetensors"
        if not inner.is_file():
            raise SystemExit(f"{path} holds no model.safetensors")
        return inner
    if not path.is_file():
        raise SystemExit(f"no such checkpoint: {path}")
    return path


def embed_pairs(weights: Path, images: np.ndarray, captions: list[str], batch: int):
    """Normalised image and own-caption embeddings of every pair, as the round sees them."""
    import torch

    from otcclip.evaluate import BundleEncoder
    from otcclip.models import create_model, model_name_of

    bundle = create_model(model_name_of(weights), weights=weights, device="cpu")
    bundle.model.eval()
    encoder = BundleEncoder(bundle, batch_size=batch)
    with torch.no_grad():
        g = encoder.images(images)
        h = encoder.texts(captions)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    h = h / np.linalg.norm(h, axis=1, keepdims=True)
    return np.ascontiguousarray(g, np.float32), np.ascontiguousarray(h, np.float32)


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if not len(positive) or not len(negative):
        return float("nan")
    y = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    return float(roc_auc_score(y, np.r_[positive, negative]))


def cached_embeddings(weights: Path, table, args: argparse.Namespace):
    if args.cache is None:
        return embed_pairs(weights, table.images, table.captions, args.batch)
    import hashlib

    key = hashlib.sha1(f"{weights.resolve()}:{weights.stat().st_mtime_ns}".encode()).hexdigest()
    path = args.cache / f"{key[:16]}.npz"
    if path.is_file():
        with np.load(path) as f:
            return f["g"], f["h"]
    g, h = embed_pairs(weights, table.images, table.captions, args.batch)
    args.cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, g=g, h=h)
    return g, h


def attack_rows(table, manifests) -> dict[str, np.ndarray]:
    """Each attack's poisoned rows, by a label that tells the variants apart."""
    ids = np.asarray(table.ids, np.int64)
    out: dict[str, np.ndarray] = {}
    for m in manifests:
        label = m.attack + (" (label-consistent)" if m.params.get("label_consistent") else "")
        if m.attack == "targeted" and m.params.get("copy_shift", 0):
            label = "targeted (varied copies)"
        out[label] = np.isin(ids, np.asarray(m.poisoned_ids, np.int64))
    return out


def config_overrides(items: list[str]) -> dict:
    """--set FIELD=VALUE pairs as DoubtConfig keyword arguments, typed like the field's
    default (a bool from true/false, numbers as numbers)."""
    import dataclasses

    from otcclip.doubt import DoubtConfig

    defaults = {f.name: f.default for f in dataclasses.fields(DoubtConfig)}
    out: dict = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in defaults:
            raise SystemExit(f"--set wants FIELD=VALUE with a DoubtConfig field, got {item!r}")
        default = defaults[name]
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"--set {name} wants true or false, got {text!r}")
            out[name] = text.lower() in ("true", "1")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            out[name] = type(default)(text)
        else:
            out[name] = text
    return out


def measure(poison_dir: Path, checkpoint: Path, args: argparse.Namespace) -> list[dict]:
    from otcclip.attacks import load_manifests
    from otcclip.data import read_pairs
    from otcclip.doubt import DoubtConfig, compute_signals, decide, pixel_evidence, pixel_screen

    table = read_pairs(poison_dir / "train.parquet")
    manifests, _ = load_manifests(poison_dir)
    t0 = time.perf_counter()
    g, h = cached_embeddings(checkpoint_weights(checkpoint), table, args)
    t_embed = time.perf_counter() - t0
    options: dict = {"threads": args.threads, "seed": args.seed}
    if args.k is not None:
        options["k"] = args.k
    if args.signals:
        options["signals"] = tuple(s.strip() for s in args.signals.split(",") if s.strip())
    if args.max_share is not None:
        options["max_share"] = args.max_share
    if args.tail is not None:
        options["tail"] = args.tail
    options.update(config_overrides(args.set))
    base = DoubtConfig(**options)
    t0 = time.perf_counter()
    pixels = pixel_evidence(table.images, base)
    t_pixels = time.perf_counter() - t0
    t0 = time.perf_counter()
    signals = compute_signals(g, h, base, pixels=pixels)
    t_signals = time.perf_counter() - t0
    rows = attack_rows(table, manifests)
    poisoned_any = np.logical_or.reduce(list(rows.values()))
    clean = ~poisoned_any
    if args.cut is not None:
        options["cut"] = args.cut
    fusions = [f.strip() for f in args.fusions.split(",")] if args.fusions else [base.fusion]
    budgets = [b.strip() for b in args.budgets.split(",")] if args.budgets else [base.budget]
    results = []
    for fusion, budget in [(f, b) for f in fusions for b in budgets]:
        config = DoubtConfig(**{**options, "fusion": fusion, "budget": budget})
        t0 = time.perf_counter()
        d = decide(signals, pixels, config)
        t_decide = time.perf_counter() - t0
        columns = {**d.signals, "fused": d.fused}
        per_attack: dict[str, dict] = {}
        for label, r in rows.items():
            entry = {name: auroc(v[r], v[clean]) for name, v in columns.items()}
            entry["recall"] = float(d.doubted[r].mean())
            per_attack[label] = entry
        doubted = d.doubted
        screened = pixel_screen(pixels, config).doubted
        results.append(
            {
                "poison_dir": str(poison_dir),
                "checkpoint": str(checkpoint),
                "fusion": f"{fusion}, budget {budget}",
                "pairs": len(table),
                "poisoned": int(poisoned_any.sum()),
                "budget_share": float(doubted.mean()),
                "precision": float(poisoned_any[doubted].mean()) if doubted.any() else float("nan"),
                "recall_all": float(doubted[poisoned_any].mean()),
                "clean_doubted": float(doubted[clean].mean()),
                "seconds_embed": t_embed,
                "seconds_pixels": t_pixels,
                "seconds_doubt": t_signals + t_decide,
                "fused_signals": list(config.signals),
                "per_attack": per_attack,
                "screen": _screen_quality(screened, poisoned_any),
                "report": d.report,
            }
        )
    return results


def _screen_quality(screened: np.ndarray, poisoned: np.ndarray) -> dict:
    """What the warm-up's pixel-only screen leaves out (it runs before any round)."""
    hit = int((screened & poisoned).sum())
    return {
        "screened": int(screened.sum()),
        "precision": hit / screened.sum() if screened.any() else float("nan"),
        "recall": hit / poisoned.sum() if poisoned.any() else float("nan"),
        "clean_screened": int((screened & ~poisoned).sum()),
    }


def _screen_line(r: dict) -> str:
    q = r["screen"]
    return (
        f"warm-up screen (pixels only) @ {r['poison_dir']}: {q['screened']} screened, "
        f"{q['clean_screened']} of them clean, precision {100 * q['precision']:.1f}%, "
        f"recall {100 * q['recall']:.1f}% (reported, no bar)"
    )


def print_result(r: dict) -> None:
    names = [n for n in next(iter(r["per_attack"].values())) if n not in ("recall",)]
    print(f"\n{r['poison_dir']} @ {r['checkpoint']} (fusion {r['fusion']})")
    print(
        f"pairs {r['pairs']}, poisoned {r['poisoned']}; doubted {100 * r['budget_share']:.1f}% "
        f"(precision {100 * r['precision']:.1f}%, recall {100 * r['recall_all']:.1f}%, "
        f"clean doubted {100 * r['clean_doubted']:.1f}%); fused: {','.join(r['fused_signals'])}; "
        f"embed {r['seconds_embed']:.1f} s, pixels (once per dataset) {r['seconds_pixels']:.1f} s, "
        f"doubt {r['seconds_doubt']:.1f} s"
    )
    print(_screen_line(r))
    head = "attack".ljust(26) + "".join(n[:11].rjust(12) for n in names) + "  recall@budget"
    print(head)
    for label, e in r["per_attack"].items():
        cells = "".join(f"{e[n]:12.3f}" for n in names)
        print(f"{label:<26}{cells}  {100 * e['recall']:12.1f}%")


def bars(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        lines.append(_screen_line(r))
        for label, e in r["per_attack"].items():
            if "label-consistent" in label:
                lines.append(
                    f"{label} @ {r['checkpoint']}: fused AUROC {e['fused']:.3f} (reported, no bar)"
                )
                continue
            ok_a = e["fused"] >= AUROC_BAR
            ok_r = e["recall"] >= RECALL_BAR
            lines.append(
                f"{label} @ {r['checkpoint']} ({r['fusion']}): fused AUROC {e['fused']:.3f} "
                f"(>= {AUROC_BAR}: {'met' if ok_a else 'NOT met'}), recall at budget "
                f"{100 * e['recall']:.1f}% (>= {100 * RECALL_BAR:.0f}%: "
                f"{'met' if ok_r else 'NOT met'}), precision {100 * r['precision']:.1f}%"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    dirs, ckpts = args.poison_dir, args.checkpoint
    if len(dirs) == 1:
        dirs = dirs * len(ckpts)
    if len(dirs) != len(ckpts):
        raise SystemExit("give one --poison-dir, or one per --checkpoint")
    print(
        f"doubt_quality: torch threads {args.threads}, rayon threads {args.threads}, "
        "release extension"
    )
    results = []
    for d, c in zip(dirs, ckpts, strict=True):
        for r in measure(d, c, args):
            print_result(r)
            results.append(r)
    print()
    for line in bars(results):
        print(line)
    if args.json is not None:
        from otcclip.atomic import write_text

        write_text(args.json, json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
