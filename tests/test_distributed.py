"""torch.distributed helpers: no-ops in one process, real collectives under torchrun.

One `torchrun --nproc_per_node 2` launch (gloo, CPU) runs this file as a worker
(`__main__` below); it exercises the helpers and a matching round with a tiny
model from scratch, and rank 0 writes what it saw to an .npz that the tests read.
The single-process reference round runs in the same worker (distributed=False),
with the same thread settings, so the comparison is exact.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from otcclip import distributed as dist

# --------------------------------------------------------------------------- one process


def test_single_process_is_a_world_of_one():
    assert not dist.is_initialized()
    assert dist.rank() == 0 and dist.world_size() == 1 and dist.is_main()
    x = np.arange(6).reshape(3, 2)
    parts = dist.all_gather_arrays(x)
    assert len(parts) == 1 and parts[0] is x
    assert dist.all_gather_concat(x) is x
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    assert dist.all_gather_object(3) == [3]
    assert dist.all_reduce_scalar(2.5, "max") == 2.5
    dist.barrier()
    assert dist.init_from_env() is False  # no torchrun environment here
    with dist.main_first():
        pass


@pytest.mark.parametrize("n", [0, 1, 7, 10, 64, 65])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("align", [1, 4, 16])
def test_shards_cover_in_order_and_align(n, world, align):
    ranges = [dist.shard_range(n, r, world, align=align) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    for (a0, a1), (b0, _) in zip(ranges, ranges[1:], strict=False):
        assert a1 == b0 and a0 <= a1
    for start, _ in ranges:
        assert start % align == 0 or start == n
    blocks = [-(-(stop - start) // align) for start, stop in ranges]
    assert max(blocks) - min(blocks) <= 1


def test_shard_range_refuses_nonsense():
    with pytest.raises(ValueError, match="rank"):
        dist.shard_range(10, 2, 2)
    with pytest.raises(ValueError, match="align"):
        dist.shard_range(10, 0, 2, align=0)
    with pytest.raises(ValueError, match="n must be"):
        dist.shard_range(-1, 0, 1)


# --------------------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def torchrun_outcome(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("torchrun") / "outcome.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OTCCLIP_TEST_OUT": str(out)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        __file__,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    with np.load(out, allow_pickle=False) as f:
        outcome = {k: f[k] for k in f.files}
    outcome["meta"] = json.loads(str(outcome["meta"]))
    return outcome


def test_gathers_arrays_of_differing_lengths(torchrun_outcome):
    meta = torchrun_outcome["meta"]
    assert meta["world"] == 2 and meta["ranks"] == [0, 1]
    # rank r contributed r + 2 rows of value r (float16 and bool too)
    np.testing.assert_array_equal(torchrun_outcome["gathered"], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(torchrun_outcome["gathered_f16"][:, 0], [0, 0, 1, 1, 1])
    assert torchrun_outcome["gathered_f16"].dtype == np.float16
    np.testing.assert_array_equal(
        torchrun_outcome["gathered_bool"], [False, False, True, True, True]
    )
    assert meta["broadcast"] == "from rank 0" and meta["objects"] == [0, 10]
    assert meta["max"] == 1 and meta["sum"] == 1
    assert "rank 1 has dtype float64" in meta["mismatch"]
    assert meta["shards"] == [[0, 8], [8, 13]]


def test_match_round_under_torchrun_equals_one_process(torchrun_outcome):
    o = torchrun_outcome
    assert o["meta"]["match_ranks_agree"]
    np.testing.assert_array_equal(o["dist_caption"], o["local_caption"])
    np.testing.assert_array_equal(o["dist_candidates"], o["local_candidates"])
    np.testing.assert_array_equal(o["dist_changed"], o["local_changed"])
    np.testing.assert_allclose(o["dist_score"], o["local_score"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(o["dist_own_score"], o["local_own_score"], rtol=0, atol=1e-6)
    # capacity held over the whole set, not per shard (no fallback beyond it)
    counts = np.bincount(o["dist_caption"][o["dist_caption"] >= 0])
    assert counts.max() <= 2
    assert o["meta"]["changed"] > 0


def _worker(out: str) -> None:
    import torch

    from otcclip.matching import MatchConfig, match_round
    from otcclip.models import create_model

    torch.set_num_threads(1)
    assert dist.init_from_env("gloo")
    r, w = dist.rank(), dist.world_size()
    meta: dict = {"world": w, "ranks": dist.all_gather_object(r)}
    gathered = dist.all_gather_concat(np.full(r + 2, r, np.int64))
    gathered_f16 = dist.all_gather_concat(np.full((r + 2, 3), r, np.float16))
    gathered_bool = dist.all_gather_concat(np.full(r + 2, bool(r)))
    meta["broadcast"] = dist.broadcast_object("from rank 0" if r == 0 else "not me")
    meta["objects"] = dist.all_gather_object(r * 10)
    meta["max"] = dist.all_reduce_scalar(r, "max")
    meta["sum"] = dist.all_reduce_scalar(r, "sum")
    try:
        dist.all_gather_arrays(np.zeros(2, np.float32 if r == 0 else np.float64))
        meta["mismatch"] = "no error"
    except ValueError as e:
        meta["mismatch"] = str(e)
    meta["shards"] = dist.all_gather_object(list(dist.shard_range(13, align=4)))

    # a tiny matching round: 2 ranks against the same round in one process
    bundle = create_model("otc-vit-tiny", seed=0)
    rng = np.random.default_rng(0)
    n = 37
    size = bundle.image_size
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    words = ["sneaker", "bag", "coat", "dress", "boot", "shirt", "left", "right", "top"]
    captions = [" ".join(rng.choice(words, size=rng.integers(2, 6))) for _ in range(n)]
    own = np.arange(n)
    cfg = MatchConfig(
        k=4,
        alpha=0.5,
        eps=0.1,
        iters=20,
        method="capacity",
        capacity=2,
        fallback="unassigned",
        margin=0.0,
        image_batch=8,
        text_batch=6,
        score_batch=10,
    )
    res = match_round(bundle, images, captions, own, cfg)
    local = match_round(bundle, images, captions, own, cfg, distributed=False) if r == 0 else res
    same = dist.all_gather_object(res.caption.tolist())
    meta["match_ranks_agree"] = all(s == same[0] for s in same)
    meta["changed"] = int(res.changed.sum())
    if dist.is_main():
        np.savez(
            out,
            meta=json.dumps(meta),
            gathered=gathered,
            gathered_f16=gathered_f16,
            gathered_bool=gathered_bool,
            dist_caption=res.caption,
            local_caption=local.caption,
            dist_candidates=res.candidates,
            local_candidates=local.candidates,
            dist_changed=res.changed,
            local_changed=local.changed,
            dist_score=res.score,
            local_score=local.score,
            dist_own_score=res.own_score,
            local_own_score=local.own_score,
        )
    dist.barrier()
    dist.destroy()


if __name__ == "__main__":
    _worker(os.environ["OTCCLIP_TEST_OUT"])
