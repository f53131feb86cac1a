"""Checkpoints: lossless state round trip, atomic replacement, pruning, clear refusals."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from otcclip import checkpoint as ckpt
from otcclip.checkpoint import (
    CheckpointError,
    capture_rng,
    checkpoint_dir,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)


@pytest.fixture(scope="module")
def bundle():
    from otcclip.models import create_model

    return create_model("otc-vit-tiny", seed=0)


def _state() -> dict:
    return {
        "epoch": 3,
        "step": 7,
        "ratio": float("nan"),
        "name": "run",
        "nothing": None,
        "tensor": torch.arange(6, dtype=torch.float32).view(2, 3),
        "array": np.array([[1, -1], [2, 5]], dtype=np.int64),
        "mask": np.array([True, False, True]),
        "blob": b"\x00\x01history",
        "empty": b"",
        "pair": (1, (2.5, "x")),
        "by_int": {0: {"exp_avg": torch.ones(2)}, 5: "five"},
        "nested": [{"a": np.float32(1.5)}, [torch.zeros(0)]],
    }


def test_state_round_trips_exactly(tmp_path, bundle):
    path = save_checkpoint(tmp_path, bundle, _state(), global_step=12)
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.path == path
    assert loaded.model_name == bundle.name
    s = loaded.state
    assert s["epoch"] == 3 and s["name"] == "run" and s["nothing"] is None
    assert math.isnan(s["ratio"])
    assert torch.equal(s["tensor"], torch.arange(6, dtype=torch.float32).view(2, 3))
    assert isinstance(s["array"], np.ndarray) and s["array"].dtype == np.int64
    assert np.array_equal(s["array"], [[1, -1], [2, 5]])
    assert s["mask"].dtype == bool and s["mask"].tolist() == [True, False, True]
    assert s["blob"] == b"\x00\x01history" and s["empty"] == b""
    assert s["pair"] == (1, (2.5, "x"))
    assert set(s["by_int"]) == {0, 5} and torch.equal(s["by_int"][0]["exp_avg"], torch.ones(2))
    assert s["nested"][0]["a"] == 1.5


def test_weights_round_trip_and_another_model_is_refused(tmp_path, bundle):
    from otcclip.models import create_model

    save_checkpoint(tmp_path, bundle, {}, global_step=1)
    fresh = create_model("otc-vit-tiny", seed=1)
    loaded = load_checkpoint(tmp_path)
    loaded.load_weights(fresh)
    for (k, a), (_, b) in zip(
        bundle.model.state_dict().items(), fresh.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    other = type("Other", (), {"name": "ViT-B-32"})()
    with pytest.raises(CheckpointError, match="otc-vit-tiny"):
        loaded.load_weights(other)


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, bundle, monkeypatch):
    good = save_checkpoint(tmp_path, bundle, {"step": 1}, global_step=1)
    pointer = (checkpoint_dir(tmp_path) / "latest.json").read_text()

    import safetensors.torch

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a fi")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(tmp_path, bundle, {"step": 2, "t": torch.ones(3)}, global_step=2)
    monkeypatch.undo()
    assert (checkpoint_dir(tmp_path) / "latest.json").read_text() == pointer
    loaded = load_checkpoint(tmp_path)
    assert loaded.path == good and loaded.state == {"step": 1}
    assert not list(checkpoint_dir(tmp_path).glob(".tmp-*"))
    assert [d.name for d in ckpt._checkpoint_dirs(checkpoint_dir(tmp_path))] == [good.name]


def test_keeps_the_newest_and_drops_stale_future_ones(tmp_path, bundle):
    paths = [save_checkpoint(tmp_path, bundle, {"s": s}, global_step=s, keep=2) for s in (1, 2, 3)]
    names = [d.name for d in ckpt._checkpoint_dirs(checkpoint_dir(tmp_path))]
    assert names == [paths[1].name, paths[2].name]
    # a run resumed from step 2 writes step 3 again: the old step-3 directory is stale
    (checkpoint_dir(tmp_path) / "latest.json").write_text(json.dumps({"dir": paths[1].name}))
    again = save_checkpoint(tmp_path, bundle, {"s": 33}, global_step=3, keep=2)
    names = [d.name for d in ckpt._checkpoint_dirs(checkpoint_dir(tmp_path))]
    assert names == [paths[1].name, again.name]
    assert load_checkpoint(tmp_path).state == {"s": 33}


def test_no_checkpoint_missing_pointer_and_damaged_pointer(tmp_path, bundle):
    assert load_checkpoint(tmp_path) is None
    path = save_checkpoint(tmp_path, bundle, {"s": 1}, global_step=4)
    (checkpoint_dir(tmp_path) / "latest.json").unlink()
    assert load_checkpoint(tmp_path).path == path  # newest complete directory
    (checkpoint_dir(tmp_path) / "latest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path)
    (checkpoint_dir(tmp_path) / "latest.json").write_text(json.dumps({"dir": path.name}))
    (path / "state.safetensors").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(tmp_path)


def test_unstorable_state_is_refused_before_writing(tmp_path, bundle):
    with pytest.raises(TypeError, match="cannot store"):
        save_checkpoint(tmp_path, bundle, {"x": object()}, global_step=1)
    assert load_checkpoint(tmp_path) is None


def test_rng_states_restore_the_same_draws():
    state = capture_rng()
    first = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng(state)
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_a_damaged_newest_checkpoint_names_the_older_complete_one(tmp_path, bundle, damage):
    """A truncated state.safetensors used to give a SafetensorError traceback."""
    old = save_checkpoint(tmp_path, bundle, {"s": 1}, global_step=1, keep=2)
    new = save_checkpoint(tmp_path, bundle, {"s": 2}, global_step=2, keep=2)
    state = new / "state.safetensors"
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[:20])
    else:
        state.unlink()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    message = str(err.value)
    assert str(new) in message and ("damaged" in message or "incomplete" in message)
    assert f"the older checkpoint {old} is complete: resume from it with --resume-from" in message
    assert "\n" not in message
    assert load_checkpoint(tmp_path, old.name).state == {"s": 1}
    with pytest.raises(CheckpointError, match="no checkpoint 'step-7' in"):
        load_checkpoint(tmp_path, "step-7")
    # with no older one to fall back on, the message says so
    (old / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no older complete checkpoint exists"):
        load_checkpoint(tmp_path)
