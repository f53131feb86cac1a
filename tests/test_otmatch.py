"""otcclip.otmatch: the Rust engine through its Python face.

Answers are checked against brute force in numpy; integer-valued embeddings
make every score exact in float32, so ties (and their lower-index rule) are
tested exactly. Also checked: inputs are read in place (no copy), refusals are
TypeError/ValueError naming the fix, the GIL is released, and a process forked
after the engine ran (a torch DataLoader worker) can still use it.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pickle
import signal
import threading
import time

import numpy as np
import pytest

from otcclip import _otmatch, otmatch


def _ints(rows: int, d: int, seed: int) -> np.ndarray:
    """Small integers as float32: exact products and sums, many ties."""
    return np.random.default_rng(seed).integers(-3, 4, size=(rows, d)).astype(np.float32)


def _unit(rows: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(q: np.ndarray, p: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q.astype(np.float64) @ p.astype(np.float64).T
    # lexsort: last key first; score descending, then index ascending
    order = np.stack([np.lexsort((np.arange(s.shape[1]), -row)) for row in s])[:, :k]
    return order.astype(np.int64), np.take_along_axis(s, order, 1).astype(np.float32)


# ------------------------------------------------------------------------------------ topk


@pytest.mark.parametrize(
    ("n", "m", "d", "k"),
    [(70, 301, 19, 16), (1, 50, 7, 50), (33, 5, 1, 5), (100, 1000, 64, 1), (3, 40, 513, 12)],
)
def test_topk_is_exact_with_ties_to_the_lower_index(n: int, m: int, d: int, k: int) -> None:
    q, p = _ints(n, d, 1), _ints(m, d, 2)
    idx, sc = otmatch.topk(q, p, k)
    want_i, want_s = _brute(q, p, k)
    assert idx.dtype == np.int64 and sc.dtype == np.float32
    assert idx.shape == sc.shape == (n, k)
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_array_equal(sc, want_s)


def test_topk_on_unit_vectors_matches_numpy_for_any_thread_count() -> None:
    q, p = _unit(200, 96, 3), _unit(3000, 96, 4)
    want_i, want_s = _brute(q, p, 10)
    for threads in (None, 1, 3):
        idx, sc = otmatch.topk(q, p, 10, threads=threads)
        np.testing.assert_array_equal(idx, want_i)
        np.testing.assert_allclose(sc, want_s, atol=1e-5)
    assert otmatch.thread_count(3) == 3
    assert otmatch.kernel_name() in ("avx512", "portable")


def test_inputs_are_read_in_place() -> None:
    q = _unit(64, 32, 5)
    # The binding's borrow (the one topk uses) points at numpy's own buffer.
    assert _otmatch._input_address(q) == q.__array_interface__["data"][0]
    # A read-only view and a memory-mapped file are read where they lie, too.
    ro = q[8:40]
    ro.flags.writeable = False
    assert _otmatch._input_address(ro) == ro.__array_interface__["data"][0]
    idx, _ = otmatch.topk(ro, q, 1)
    np.testing.assert_array_equal(idx[:, 0], np.arange(8, 40))
    # Anything that would need a copy is refused, never converted behind the caller's back.
    with pytest.raises(ValueError, match=r"C-contiguous.*np\.ascontiguousarray"):
        _otmatch._input_address(q[:, ::2])
    with pytest.raises(ValueError, match="C-contiguous"):
        otmatch.topk(np.asfortranarray(q), q, 1)
    with pytest.raises(TypeError, match=r"dtype float32, got float64.*astype\(np\.float32\)"):
        otmatch.topk(q.astype(np.float64), q, 1)
    with pytest.raises(TypeError, match="float32"):
        otmatch.topk(q, q.astype(">f4"), 1)


def test_memory_mapped_pool(tmp_path) -> None:
    p = _unit(500, 16, 6)
    np.save(tmp_path / "p.npy", p)
    mm = np.load(tmp_path / "p.npy", mmap_mode="r")
    assert _otmatch._input_address(mm) == mm.__array_interface__["data"][0]
    idx, _ = otmatch.topk(p[:10], mm, 3)
    np.testing.assert_array_equal(idx[:, 0], np.arange(10))


def test_topk_refuses_bad_input_with_a_clear_error() -> None:
    q, p = _unit(4, 8, 7), _unit(9, 8, 8)
    cases = [
        ((q, p, 0), ValueError, "k must be at least 1"),
        ((q, p, -2), ValueError, "k must be at least 1"),
        ((q, p, 10), ValueError, "exceeds the pool's 9 rows"),
        ((q, p[:, :5].copy(), 2), ValueError, "d = 8 columns but pool has d = 5"),
        ((q[:0], p, 2), ValueError, "queries is empty"),
        ((q, p[:0], 2), ValueError, "pool is empty"),
        ((q[:, :0].copy(), p[:, :0].copy(), 2), ValueError, "dimension d is 0"),
        ((q[0], p, 2), ValueError, r"2-D \(rows, d\), got shape \[8\]"),
        ((q.tolist(), p, 2), TypeError, "numpy.ndarray of float32, got list"),
        ((q.astype(np.float16), p, 2), TypeError, "float16"),
        ((q > 0, p, 2), TypeError, "bool"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            otmatch.topk(*args)
    bad = q.copy()
    bad[2, 5] = np.nan
    with pytest.raises(
        ValueError, match=r"queries contain NaN or inf.*\(first at row 2, column 5\)"
    ):
        otmatch.topk(bad, p, 2)
    bad = p.copy()
    bad[7, 0] = -np.inf
    with pytest.raises(ValueError, match=r"pool contains NaN or inf.*\(first at row 7, column 0\)"):
        otmatch.topk(q, bad, 2)
    huge = np.full((2, 4), 1e20, np.float32)
    with pytest.raises(ValueError, match="overflow float32"):
        otmatch.topk(huge, huge, 1)
    with pytest.raises(ValueError, match="threads must be at least 1"):
        otmatch.topk(q, p, 2, threads=0)


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_thread_counts_are_bounded_and_pools_do_not_pile_up() -> None:
    """threads=2000 used to start 2000 OS threads for good, each new count one more pool."""
    q, p = _unit(20, 8, 31), _unit(50, 8, 32)
    limit = otmatch.max_threads()
    assert limit >= 8
    with pytest.raises(ValueError, match=f"threads must be at most {limit} .* got 2000"):
        otmatch.topk(q, p, 2, threads=2000)
    with pytest.raises(ValueError, match="threads must be at most"):
        otmatch.thread_count(limit + 1)
    otmatch.topk(q, p, 2, threads=limit)
    before = _os_threads()
    for count in range(2, 8):
        otmatch.topk(q, p, 2, threads=count)
    # At most two dedicated pools stay alive (counts 7 and 6): the pool of `limit` threads
    # is retired, and 2 + 3 + ... + 7 = 27 threads did not pile up.
    bound = before - limit + 7 + 6
    deadline = time.monotonic() + 5
    while _os_threads() > bound and time.monotonic() < deadline:
        time.sleep(0.05)  # retired pools' threads end asynchronously
    assert _os_threads() <= bound


def test_topk_releases_the_gil() -> None:
    q, p = _unit(2000, 128, 9), _unit(20000, 128, 10)
    seen: dict[str, int] = {}
    counter = 0

    def work() -> None:
        seen["before"] = counter
        otmatch.topk(q, p, 8, threads=1)
        seen["after"] = counter

    t = threading.Thread(target=work)
    t.start()
    while t.is_alive():
        counter += 1
    t.join()
    # Holding the GIL, topk would leave this loop no turn at all during the call.
    assert seen["after"] - seen["before"] > 1000


def _wait_child(pid: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in topk")
        time.sleep(0.02)


_FORK_Q = _unit(300, 24, 11)
_FORK_P = _unit(2000, 24, 12)


def _child_topk(threads: int | None) -> np.ndarray:
    return otmatch.topk(_FORK_Q, _FORK_P, 5, threads=threads)[0]


def _child_assign() -> np.ndarray:
    idx, sc = otmatch.topk(_FORK_Q, _FORK_P, 5)
    return otmatch.assign(idx, sc, method="capacity", capacity=1).caption


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_can_use_topk() -> None:
    want = _child_topk(None)  # the parent starts the shared pool...
    _child_topk(2)  # ...and a dedicated one
    want_assign = _child_assign()
    pid = os.fork()
    if pid == 0:  # child: both pools' threads are gone here
        code = 1
        try:
            ok = all(np.array_equal(_child_topk(t), want) for t in (None, 2, 3))
            ok = ok and np.array_equal(_child_assign(), want_assign)
            code = 0 if ok else 3
        finally:
            os._exit(code)
    assert _wait_child(pid) == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_multiprocessing_fork_workers_can_use_topk() -> None:
    want = _child_topk(None)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as workers:
        got = workers.map_async(_child_topk, [None, 2]).get(timeout=60)
    for g in got:
        np.testing.assert_array_equal(g, want)


# ---------------------------------------------------------------------------------- assign


def _reference_assign(
    cand, scores, own, own_scores, method, capacity, margin, fallback, counts=None
):
    """The rule written plainly: rank each row, sort all entries globally, walk once.

    `counts`, a dict, receives kept_by_margin: images that keep their own caption by
    the margin although their best candidate is another caption.
    """
    counts = {} if counts is None else counts
    n, k = cand.shape
    rank = [sorted(range(k), key=lambda e, i=i: (-scores[i, e], cand[i, e])) for i in range(n)]
    best = [(cand[i, rank[i][0]], scores[i, rank[i][0]]) for i in range(n)]
    own_of = [-1 if own is None else int(own[i]) for i in range(n)]
    own_sc = []
    for i in range(n):
        if own_of[i] < 0:
            own_sc.append(None)
        elif own_scores is not None:
            own_sc.append(float(own_scores[i]) if np.isfinite(own_scores[i]) else None)
        else:
            hits = [scores[i, e] for e in range(k) if cand[i, e] == own_of[i]]
            own_sc.append(max(hits) if hits else None)
    keep = [s is not None and s >= best[i][1] - np.float32(margin) for i, s in enumerate(own_sc)]
    caption = [-1] * n
    if method == "argmax":
        counts["kept_by_margin"] = sum(keep[i] and best[i][0] != own_of[i] for i in range(n))
        return [own_of[i] if keep[i] else int(best[i][0]) for i in range(n)]
    load: dict[int, int] = {}
    counts["kept_by_margin"] = 0
    for i in sorted((i for i in range(n) if keep[i]), key=lambda i: (-own_sc[i], i)):
        if load.get(own_of[i], 0) < capacity:
            load[own_of[i]] = load.get(own_of[i], 0) + 1
            caption[i] = own_of[i]
            counts["kept_by_margin"] += int(best[i][0] != own_of[i])
    entries = sorted(
        ((scores[i, rank[i][r]], i, r) for i in range(n) for r in range(k)),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    for _, i, r in entries:
        c = int(cand[i, rank[i][r]])
        if caption[i] < 0 and load.get(c, 0) < capacity:
            load[c] = load.get(c, 0) + 1
            caption[i] = c
    if fallback == "own":
        caption = [own_of[i] if caption[i] < 0 else caption[i] for i in range(n)]
    return caption


@pytest.mark.parametrize("seed", range(40))
def test_assign_matches_the_plain_rule(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k, pool = int(rng.integers(1, 30)), int(rng.integers(1, 6)), int(rng.integers(1, 12))
    cand = rng.integers(0, pool, size=(n, k)).astype(np.int64)
    scores = (rng.integers(0, 6, size=(n, k)) * 0.25).astype(np.float32)
    own = rng.integers(-1, pool, size=n).astype(np.int64) if seed % 4 else None
    own_scores = None
    if own is not None and seed % 3 == 0:
        own_scores = (rng.integers(0, 7, size=n) * 0.25).astype(np.float32)
        own_scores[own_scores > 1.4] = -np.inf
    method = "capacity" if seed % 2 else "argmax"
    capacity = int(rng.integers(1, 4)) if method == "capacity" else None
    margin = float(rng.choice([0.0, 0.25, 0.5]))
    fallback = "unassigned" if seed % 5 == 0 else "own"
    a = otmatch.assign(cand, scores, own, own_scores, method, capacity, margin, fallback)
    counts: dict[str, int] = {}
    want = _reference_assign(
        cand, scores, own, own_scores, method, capacity, margin, fallback, counts
    )
    np.testing.assert_array_equal(a.caption, np.array(want, dtype=np.int64))
    assert a.caption.dtype == np.int64 and a.changed.dtype == bool and a.score.dtype == np.float32
    want_changed = np.zeros(n, bool) if own is None else a.caption != own
    np.testing.assert_array_equal(a.changed, want_changed)
    assigned = a.caption[a.caption >= 0]
    loads = np.bincount(assigned) if len(assigned) else np.zeros(1, int)
    assert a.stats == {
        "n": n,
        "changed": int(want_changed.sum()),
        "distinct": len(np.unique(assigned)),
        "max_load": int(loads.max()),
        "unassigned": int((a.caption < 0).sum()),
        "kept_by_margin": counts["kept_by_margin"],
    }
    assert np.isnan(a.score[a.caption < 0]).all()


def test_assign_capacity_and_margin_by_hand() -> None:
    # Three images all prefer caption 7; capacity 1 spreads them.
    cand = np.array([[7, 1], [7, 2], [7, 1]], np.int64)
    scores = np.array([[0.9, 0.3], [0.8, 0.7], [0.95, 0.2]], np.float32)
    own = np.array([10, 11, 12], np.int64)
    a = otmatch.assign(cand, scores, own=own, method="capacity", capacity=1)
    np.testing.assert_array_equal(a.caption, [1, 2, 7])
    np.testing.assert_allclose(a.score, [0.3, 0.7, 0.95])
    assert a.stats["max_load"] == 1 and a.stats["changed"] == 3
    # Own caption 11 scores 0.78 against a best of 0.8: kept with margin 0.05, not with 0.01.
    own_scores = np.array([0.1, 0.78, 0.1], np.float32)
    a = otmatch.assign(cand, scores, own=own, own_scores=own_scores, margin=0.05)
    np.testing.assert_array_equal(a.caption, [7, 11, 7])
    assert a.stats["kept_by_margin"] == 1
    np.testing.assert_array_equal(a.changed, [True, False, True])
    a = otmatch.assign(cand, scores, own=own, own_scores=own_scores, margin=0.01)
    np.testing.assert_array_equal(a.caption, [7, 7, 7])
    # -inf own score: never kept.
    own_scores[1] = -np.inf
    a = otmatch.assign(cand, scores, own=own, own_scores=own_scores, margin=10.0)
    assert a.caption[1] == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.caption = a.caption  # type: ignore[misc]


def test_assign_refuses_bad_input() -> None:
    cand = np.array([[0, 1], [2, 3]], np.int64)
    scores = np.array([[0.1, 0.2], [0.3, 0.4]], np.float32)
    own = np.array([0, 1], np.int64)
    cases = [
        ({"method": "auction"}, ValueError, "method must be 'argmax' or 'capacity'"),
        ({"method": "capacity"}, ValueError, "needs capacity=C"),
        ({"method": "capacity", "capacity": 0}, ValueError, "capacity must be at least 1"),
        ({"capacity": 3}, ValueError, "only applies to method='capacity'"),
        ({"fallback": "drop"}, ValueError, "fallback must be 'own' or 'unassigned'"),
        ({"margin": -0.5}, ValueError, "margin must be finite and >= 0"),
        ({"margin": float("nan")}, ValueError, "margin must be finite"),
        ({"own": own[:1]}, ValueError, r"one entry per image \(2\)"),
        ({"own": own.astype(np.int32)}, TypeError, r"astype\(np\.int64\)"),
        ({"own": own, "own_scores": np.array([np.nan, 1], np.float32)}, ValueError, "own_scores"),
        ({"own_scores": np.zeros(2, np.float32)}, ValueError, "without own"),
    ]
    for kwargs, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            otmatch.assign(cand, scores, **kwargs)
    with pytest.raises(ValueError, match=r"found -4 at row 1, column 0"):
        otmatch.assign(np.array([[0, 1], [-4, 3]], np.int64), scores)
    with pytest.raises(ValueError, match=r"NaN or infinity \(first at row 0, column 1\)"):
        otmatch.assign(cand, np.array([[0.1, np.inf], [0.3, 0.4]], np.float32))
    with pytest.raises(ValueError, match="shape of candidates"):
        otmatch.assign(cand, scores[:, :1].copy())
    with pytest.raises(TypeError, match="int64"):
        otmatch.assign(cand.astype(np.float32), scores)
    with pytest.raises(ValueError, match="empty"):
        otmatch.assign(cand[:0], scores[:0])


# --------------------------------------------------------------------------------- History


def test_history_records_changes_and_round_trips() -> None:
    h = otmatch.History()
    ids = np.array([100, 200, 300], np.int64)
    h.record(0, ids, np.array([1, 2, 3], np.int64))
    h.record(1, ids, np.array([1, 5, 3], np.int64))
    h.record(2, ids[1:], np.array([2, 3], np.int64))
    assert len(h) == 3
    assert h.get(200) == [(0, 2), (1, 5), (2, 2)]
    assert h.changes(200) == 2 and h.changes(100) == 0 and h.changes(300) == 0
    assert h.get(999) == []
    np.testing.assert_array_equal(h.ids(), ids)
    b = h.to_bytes()
    back = otmatch.History.from_bytes(b)
    assert back == h and back.to_bytes() == b
    assert pickle.loads(pickle.dumps(h)) == h


def test_history_refuses_bad_records_and_bytes() -> None:
    h = otmatch.History()
    h.record(3, np.array([1, 2], np.int64), np.array([5, 6], np.int64))
    before = h.to_bytes()
    with pytest.raises(ValueError, match="appears twice"):
        h.record(4, np.array([7, 7], np.int64), np.array([0, 0], np.int64))
    with pytest.raises(ValueError, match="rounds must increase"):
        h.record(3, np.array([9, 2], np.int64), np.array([0, 0], np.int64))
    with pytest.raises(ValueError, match="same length"):
        h.record(5, np.array([9], np.int64), np.array([0, 0], np.int64))
    with pytest.raises(TypeError, match="int64"):
        h.record(5, np.array([9], np.int32), np.array([0], np.int64))
    assert h.to_bytes() == before  # nothing recorded by the refused calls
    for bad in (b"", before[:-1], before + b"\0", b"XXXXXXXX" + before[8:]):
        with pytest.raises(ValueError):
            otmatch.History.from_bytes(bad)
