"""Thin helpers over torch.distributed that degrade to no-ops in a single process.

Code that runs under `torchrun` (the matching round, the trainer) calls these
unconditionally; with no process group initialised every helper answers as a
world of one (rank 0, gather returns the input), so the same code path serves
one process and many, and a single-process run never imports a backend.

Arrays cross ranks as numpy arrays: the helpers move them into torch tensors
on the backend's device (CPU for gloo, the current CUDA device for NCCL) and
back. Gathers accept arrays whose first dimension differs between ranks (the
shards of N items rarely divide evenly); the trailing shape and the dtype must
agree, and a mismatch is a clear error on every rank rather than a hang or
garbage.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "is_initialized",
    "rank",
    "world_size",
    "local_rank",
    "local_world_size",
    "is_main",
    "barrier",
    "shard_range",
    "all_gather_arrays",
    "all_gather_concat",
    "all_reduce_scalar",
    "broadcast_object",
    "all_gather_object",
    "init_from_env",
    "destroy",
    "main_first",
]

# dtypes a gather can carry; the position is sent to the other ranks so that a
# mismatch is detected before any payload moves.
_DTYPES: tuple[np.dtype, ...] = tuple(
    np.dtype(t)
    for t in (
        np.bool_,
        np.uint8,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.float16,
        np.float32,
        np.float64,
    )
)
_MAX_NDIM = 8


def is_initialized() -> bool:
    """True when a torch.distributed process group is up (False if unavailable)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """The rank on this node (torchrun's LOCAL_RANK), 0 outside torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """The processes on this node (torchrun's LOCAL_WORLD_SIZE), 1 outside torchrun."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0: the one process that prints, shows progress bars and writes files."""
    return rank() == 0


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        dist.barrier()


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group that `torchrun` describes in the environment.

    Returns True when a group is up afterwards. Outside torchrun (no
    WORLD_SIZE in the environment) it does nothing, so commands can call it
    unconditionally. The backend defaults to NCCL when CUDA is present and to
    gloo otherwise.
    """
    if is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ or not dist.is_available():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    return True


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Let rank 0 run the body before the others (e.g. to build a cache the rest then read)."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def shard_range(
    n: int, rank: int | None = None, world_size: int | None = None, align: int = 1
) -> tuple[int, int]:
    """The contiguous slice [start, stop) of n items that `rank` owns.

    Items are split in blocks of `align` (the last block may be short) and the
    blocks as evenly as possible, earlier ranks taking one more. Aligning the
    shards to the batch size makes every rank run exactly the batches a single
    process would, which keeps floating-point results identical across world
    sizes. Contiguous shards in rank order concatenate back into the original
    order, which is what `all_gather_concat` relies on.
    """
    r = _rank_arg(rank)
    w = _world_arg(world_size)
    if n < 0:
        raise ValueError(f"shard_range: n must be >= 0, got {n}")
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"shard_range: need 0 <= rank < world_size, got rank {r}, world {w}")
    if align < 1:
        raise ValueError(f"shard_range: align must be >= 1, got {align}")
    blocks = -(-n // align)
    base, extra = divmod(blocks, w)
    start_block = r * base + min(r, extra)
    stop_block = start_block + base + (1 if r < extra else 0)
    return min(start_block * align, n), min(stop_block * align, n)


def all_gather_arrays(array: np.ndarray) -> list[np.ndarray]:
    """Every rank's array, in rank order; lengths along dim 0 may differ.

    The trailing shape and dtype must match across ranks (checked). In a
    single process this returns `[array]`.
    """
    array = np.asarray(array)
    if not is_initialized() or world_size() == 1:
        return [array]
    if array.ndim == 0:
        raise ValueError("all_gather_arrays: needs an array with at least one dimension")
    if array.ndim > _MAX_NDIM:
        raise ValueError(f"all_gather_arrays: at most {_MAX_NDIM} dimensions, got {array.ndim}")
    dtype = array.dtype.newbyteorder("=") if array.dtype.byteorder == ">" else array.dtype
    if dtype not in _DTYPES:
        raise TypeError(
            f"all_gather_arrays: unsupported dtype {array.dtype}; expected one of "
            + ", ".join(str(d) for d in _DTYPES)
        )
    device = _device()
    meta = np.full(3 + _MAX_NDIM, -1, dtype=np.int64)
    meta[0] = array.shape[0]
    meta[1] = _DTYPES.index(dtype)
    meta[2] = array.ndim
    meta[3 : 3 + array.ndim - 1] = array.shape[1:]
    metas = _gather_tensor(torch.from_numpy(meta).to(device))
    metas = [m.cpu().numpy() for m in metas]
    for r, m in enumerate(metas):
        if not np.array_equal(m[1:], metas[0][1:]):
            raise ValueError(
                "all_gather_arrays: ranks disagree on dtype or trailing shape: rank 0 has "
                f"{_describe(metas[0])}, rank {r} has {_describe(m)}"
            )
    lengths = [int(m[0]) for m in metas]
    longest = max(lengths)
    padded = np.zeros((longest, *array.shape[1:]), dtype=dtype)
    padded[: array.shape[0]] = array
    # bool travels as uint8: not every backend reduces or gathers bool tensors.
    wire = padded.view(np.uint8) if dtype == np.bool_ else padded
    parts = _gather_tensor(torch.from_numpy(np.ascontiguousarray(wire)).to(device))
    out = []
    for part, length in zip(parts, lengths, strict=True):
        arr = part.cpu().numpy()[:length]
        out.append(arr.view(np.bool_) if dtype == np.bool_ else arr)
    return out


def all_gather_concat(array: np.ndarray) -> np.ndarray:
    """Every rank's array concatenated along dim 0 in rank order (the input in one process)."""
    parts = all_gather_arrays(array)
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts, axis=0)


def all_reduce_scalar(value: float, op: str = "sum") -> float:
    """Reduce one number over ranks: op is "sum", "max" or "min"; float64 on the wire."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"all_reduce_scalar: op must be one of {sorted(ops)}, got {op!r}")
    if not is_initialized() or world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=ops[op])
    result = t.item()
    return int(result) if isinstance(value, (int, np.integer)) else result


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (pickled; for small things: configs, decisions)."""
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_device())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's (small, picklable) object, in rank order."""
    if not is_initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _gather_tensor(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return out


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _describe(meta: np.ndarray) -> str:
    ndim = int(meta[2])
    trailing = tuple(int(x) for x in meta[3 : 3 + ndim - 1])
    shape = ", ".join(["n", *map(str, trailing)])
    return f"dtype {_DTYPES[int(meta[1])]}, shape ({shape})"


def _rank_arg(r: int | None) -> int:
    return rank() if r is None else r


def _world_arg(w: int | None) -> int:
    return world_size() if w is None else w
