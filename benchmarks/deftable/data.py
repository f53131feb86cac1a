"""The table's data: one poisoned (or clean, or adaptive) set per variant and seed."""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deftable.rows import ATTACKS

DATA_SPEC = "table_data.json"


def data_dir(out: Path, variant: str, seed: int) -> Path:
    return out / "data" / f"{variant}-seed{seed}"


def adaptive_count(config: Any) -> int:
    return config.n_backdoor if config.n_adaptive is None else config.n_adaptive


def varied_count(config: Any) -> int:
    return config.n_captions if config.n_varied is None else config.n_varied


def copy_variation(config: Any) -> dict[str, Any]:
    """The varied rows' per-copy variation (`targeted_poison`'s copy_shift and copy_noise)."""
    return {"copy_shift": int(config.copy_shift), "copy_noise": float(config.copy_noise)}


def _clean_scenes(config: Any) -> Any:
    from otcclip.data import fashion_scenes

    return fashion_scenes(
        config.scenes, seed=config.seed, image_size=config.image_size, max_items=config.max_items
    )


def _poison_variant(clean: Any, config: Any, variant: str) -> tuple[Any, list[Any]]:
    """The adaptive or varied-copies data: targeted poisoning (seed + 1), then its backdoor
    (seed + 2) on pairs the targets did not touch, as `poison_command` records."""
    from otcclip.attacks import adaptive_backdoor, backdoor, poisoned_ids, targeted_poison

    variation = copy_variation(config) if variant == "varied" else {}
    table, targeted = targeted_poison(
        clean,
        config.n_targets,
        varied_count(config) if variant == "varied" else config.n_captions,
        config.target_label,
        config.seed + 1,
        **variation,
    )
    touched = poisoned_ids([targeted])
    if variant == "adaptive":
        table, second = adaptive_backdoor(
            table,
            adaptive_count(config),
            config.target_label,
            config.seed + 2,
            exclude_ids=touched,
        )
    else:
        table, second = backdoor(
            table,
            "badnet",
            config.n_backdoor,
            config.target_label,
            config.seed + 2,
            exclude_ids=touched,
        )
    return table, [targeted, second]


def data_spec(config: Any, variant: str) -> dict[str, Any]:
    spec = {
        "variant": variant,
        "seed": config.seed,
        "attacks": ATTACKS[variant],
        "scenes": config.scenes,
        "max_items": config.max_items,
        "image_size": config.image_size,
        "target_label": config.target_label,
        "n_targets": config.n_targets,
        "n_captions": config.n_captions,
        "n_backdoor": config.n_backdoor,
    }
    if variant == "adaptive":  # its backdoor has a count of its own
        spec["n_backdoor"] = adaptive_count(config)
    if variant == "varied":  # its copies have a count and a variation of their own
        spec.update(copy_variation(config), n_captions=varied_count(config))
    return spec


def poison_command(config: Any, variant: str, directory: Path) -> str:
    """The `otcclip poison` command that writes the same data (the demo's seeds: k, k+1, k+2)."""
    parts = [
        f"otcclip poison --out {shlex.quote(str(directory))} --scenes {config.scenes}",
        f"--max-items {config.max_items} --image-size {config.image_size}",
    ]
    if ATTACKS[variant]:
        spec = data_spec(config, variant)
        parts.append(" ".join(f"--attack {a}" for a in ATTACKS[variant]))
        parts.append(
            f"--target-label {config.target_label} --n-targets {config.n_targets} "
            f"--n-captions {spec['n_captions']} --n-poison {spec['n_backdoor']}"
        )
    if variant == "varied":
        parts.append(f"--copy-shift {config.copy_shift} --copy-noise {config.copy_noise:g}")
    parts.append(f"--seed {config.seed}")
    return " ".join(parts)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def ensure_data(out: Path, config: Any, variants: set[str], echo: Callable[[str], None]) -> None:
    """Build the (variant, seed) data that are missing or were built with other settings."""
    from otcclip.atomic import write_text

    stale = sorted(
        v
        for v in variants
        if _read_json(data_dir(out, v, config.seed) / DATA_SPEC) != data_spec(config, v)
        or not (data_dir(out, v, config.seed) / "train.parquet").is_file()
    )
    if not stale:
        return
    from otcclip.attacks import save_manifests
    from otcclip.data import write_pairs
    from otcclip.demo import build_poisoned_data

    start = time.perf_counter()
    root = out / "data"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-seed{config.seed}.", dir=root))
    try:
        clean = None
        if "clean" in stale or "poisoned" in stale:
            # exactly the demo's data: writes tmp/poisoned (train.parquet, manifest.json, ...)
            clean, _, _ = build_poisoned_data(dataclasses.replace(config, out=str(tmp)))
        if "clean" in stale:
            write_pairs(clean, tmp / "clean" / "train.parquet")
            save_manifests(tmp / "clean", [], {"n_rows": len(clean), "scenes": config.scenes})
        for variant in ("adaptive", "varied"):
            if variant in stale:
                clean = clean if clean is not None else _clean_scenes(config)
                table, manifests = _poison_variant(clean, config, variant)
                write_pairs(table, tmp / variant / "train.parquet")
                save_manifests(
                    tmp / variant, manifests, {"n_rows": len(table), "scenes": config.scenes}
                )
        for variant in stale:
            built = tmp / variant
            write_text(built / DATA_SPEC, json.dumps(data_spec(config, variant), indent=2) + "\n")
            dest = data_dir(out, variant, config.seed)
            if dest.exists():
                shutil.rmtree(dest)
            built.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    echo(
        f"[defense_table] built data {', '.join(f'{v}-seed{config.seed}' for v in stale)} "
        f"({config.scenes} scenes) in {time.perf_counter() - start:.1f}s"
    )
