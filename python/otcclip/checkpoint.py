"""Training checkpoints: model weights in safetensors, the rest as safetensors + JSON.

A checkpoint is a directory `RUN/checkpoints/step-<global step>-<tag>/` holding
  model.safetensors  the weights, written by `otcclip.models.save_weights`
                     (its metadata names the model, so loading into another
                     model is a clear error);
  state.safetensors  every tensor and array of the training state (optimiser
                     moments, RNG states, the caption assignment, banks, ...);
  state.json         the structure of that state with everything else (counters,
                     config, metrics so far), referring to the tensors by key.
The directory is filled under a temporary name and renamed into place only when
complete; then `RUN/checkpoints/latest.json` is replaced atomically to point at
it; only then are older checkpoints removed. A SIGKILL or a full disk at any
moment therefore leaves the previous good checkpoint loadable (and at worst a
stray temporary directory, cleared by the next save).

No pickle anywhere: a checkpoint is safe to load from an untrusted source.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from otcclip.atomic import write_text

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "capture_rng",
    "checkpoint_dir",
    "latest_checkpoint_path",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

FORMAT = 1
POINTER = "latest.json"
_DIR_PATTERN = re.compile(r"^step-(\d+)-[0-9a-f]+$")
_FILES = ("model.safetensors", "state.safetensors", "state.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, damaged, or from another model."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: where it lies, the model it holds, and the decoded state."""

    path: Path
    model_name: str
    state: dict[str, Any]

    @property
    def weights(self) -> Path:
        return self.path / "model.safetensors"

    def load_weights(self, bundle: Any) -> None:
        """Load the weights into `bundle` (a clear error when it is another model)."""
        if getattr(bundle, "name", self.model_name) != self.model_name:
            raise CheckpointError(
                f"checkpoint {self.path} holds model {self.model_name!r}, not {bundle.name!r}"
            )
        from otcclip.models import load_weights

        load_weights(bundle, self.weights)


def checkpoint_dir(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    bundle: Any,
    state: dict[str, Any],
    *,
    global_step: int,
    keep: int = 2,
) -> Path:
    """Write a checkpoint atomically and point `latest.json` at it; returns its directory.

    `state` is a tree of dicts/lists/tuples whose leaves are JSON scalars,
    torch tensors, numpy arrays or bytes. Keeps the `keep` newest checkpoints.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stray_temporaries(root)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors)
    name = f"step-{int(global_step):09d}-{secrets.token_hex(3)}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        from safetensors.torch import save_file

        from otcclip.models import save_weights

        save_weights(bundle, tmp / "model.safetensors")
        save_file(tensors, str(tmp / "state.safetensors"), metadata={"format": str(FORMAT)})
        doc = {
            "format": FORMAT,
            "model": bundle.name,
            "global_step": int(global_step),
            "state": tree,
        }
        (tmp / "state.json").write_text(json.dumps(doc), encoding="utf-8")
        for f in _FILES:
            _fsync(tmp / f)
        os.rename(tmp, root / name)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text(root / POINTER, json.dumps({"dir": name, "global_step": int(global_step)}))
    _prune(root, keep=keep, current=name)
    return root / name


def load_checkpoint(run_dir: str | os.PathLike[str], name: str | None = None) -> Checkpoint | None:
    """The checkpoint `latest.json` points at (or the newest complete one); None if none.

    `name` (a `step-...` directory in RUN/checkpoints) loads that one instead: the way
    back when the newest is damaged. A damaged or incomplete checkpoint is a
    CheckpointError that names the newest older one that loads, if any.
    """
    root = checkpoint_dir(run_dir)
    if name is not None:
        return _read(_named(root, name))
    if not root.is_dir():
        return None
    target = _pointer_target(root)
    if target is None:
        complete = [d for d in _checkpoint_dirs(root) if _complete(d)]
        if not complete:
            return None
        target = complete[-1]
    try:
        return _read(target)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {_older_advice(root, target)}") from exc


def latest_checkpoint_path(run_dir: str | os.PathLike[str]) -> Path | None:
    """The directory `latest.json` points at, without loading it (None when there is none)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return None
    try:
        target = _pointer_target(root)
    except CheckpointError:
        return None
    return target if target is not None and target.is_dir() else None


def _named(root: Path, name: str) -> Path:
    """RUN/checkpoints/<name>, refused unless it is a checkpoint directory there."""
    name = Path(name).name  # a path to the directory works too
    target = root / name
    if not _DIR_PATTERN.match(name) or not target.is_dir():
        found = ", ".join(d.name for d in _checkpoint_dirs(root)) if root.is_dir() else ""
        raise CheckpointError(f"no checkpoint {name!r} in {root} (it holds: {found or 'none'})")
    return target


def _step_of(d: Path) -> int:
    match = _DIR_PATTERN.match(d.name)
    return int(match.group(1)) if match else -1


def _read(target: Path) -> Checkpoint:
    """Load one checkpoint directory; any damage becomes a CheckpointError naming it."""
    missing = [f for f in _FILES if not (target / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {target} is incomplete (missing {', '.join(missing)})")
    try:
        doc = json.loads((target / "state.json").read_text(encoding="utf-8"))
        from safetensors.torch import load_file

        tensors = load_file(str(target / "state.safetensors"))
        state = _decode(doc["state"], tensors)
        model = str(doc["model"])
    except Exception as exc:  # safetensors raises its own SafetensorError; JSON, KeyError, ...
        reason = " ".join(str(exc).split())[:200]
        raise CheckpointError(
            f"checkpoint {target} is damaged ({type(exc).__name__}: {reason})"
        ) from exc
    if doc.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {target} has format {doc.get('format')!r}; this otcclip reads {FORMAT}"
        )
    return Checkpoint(path=target, model_name=model, state=state)


def _older_advice(root: Path, broken: Path) -> str:
    """Name the newest checkpoint older than `broken` that loads, and how to resume from it."""
    step = _step_of(broken)
    for d in reversed(_checkpoint_dirs(root)):
        if d == broken or _step_of(d) > step or not _complete(d):
            continue
        try:
            _read(d)
        except CheckpointError:
            continue
        return f"the older checkpoint {d} is complete: resume from it with --resume-from {d.name}"
    return "no older complete checkpoint exists"


def capture_rng() -> dict[str, Any]:
    """Every global random state training touches: Python, numpy (legacy), torch CPU and CUDA."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to(torch.uint8).cpu() for s in state["cuda"]])


# --------------------------------------------------------------------------- tree codec


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"checkpoint state: cannot store a numpy array of dtype {obj.dtype}")
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": key}
    if isinstance(obj, (bytes, bytearray)):
        key = f"t{len(tensors)}"
        tensors[key] = (
            torch.frombuffer(bytearray(obj), dtype=torch.uint8).clone()
            if obj
            else (torch.zeros(0, dtype=torch.uint8))
        )
        return {"__bytes__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    raise TypeError(f"checkpoint state: cannot store a {type(obj).__name__}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy()
    if "__bytes__" in obj:
        return tensors[obj["__bytes__"]].numpy().tobytes()
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


# --------------------------------------------------------------------------- files


def _pointer_target(root: Path) -> Path | None:
    pointer = root / POINTER
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text(encoding="utf-8"))["dir"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{pointer} is damaged: {exc}") from exc
    if not isinstance(name, str) or not _DIR_PATTERN.match(name):
        raise CheckpointError(f"{pointer} names an invalid checkpoint directory {name!r}")
    return root / name


def _checkpoint_dirs(root: Path) -> list[Path]:
    """Checkpoint directories, oldest first (by global step, then modification time)."""
    found = []
    for d in root.iterdir():
        match = _DIR_PATTERN.match(d.name)
        if match and d.is_dir():
            found.append((int(match.group(1)), d.stat().st_mtime, d))
    return [d for _, _, d in sorted(found)]


def _complete(d: Path) -> bool:
    return all((d / f).is_file() for f in _FILES)


def _prune(root: Path, keep: int, current: str) -> None:
    """Keep `current` and the keep - 1 newest older ones.

    Directories at or past the current step other than `current` are left-overs
    of a run that was killed and resumed from an earlier checkpoint: stale.
    """
    step = int(_DIR_PATTERN.match(current).group(1))  # type: ignore[union-attr]
    others = [d for d in _checkpoint_dirs(root) if d.name != current]
    older = [d for d in others if int(_DIR_PATTERN.match(d.name).group(1)) < step]  # type: ignore[union-attr]
    stale = [d for d in others if d not in older]
    for d in stale + older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(d, ignore_errors=True)


def _remove_stray_temporaries(root: Path) -> None:
    for d in root.glob(".tmp-*"):
        shutil.rmtree(d, ignore_errors=True)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
