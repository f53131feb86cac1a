"""`train --stream`: the streamed trainer computes what the in-memory one computes on the
same batches, resumes exactly after SIGKILL, shares an epoch between two processes, and
refuses what it cannot do yet.

Like tests/test_train.py, this file is also the worker script of its subprocess tests
(see the bottom): a streamed run killed mid-epoch, and two torchrun processes.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from otcclip.checkpoint import load_checkpoint
from otcclip.cli import main
from otcclip.data import DataError, fashion_scenes, read_pairs, write_shards
from otcclip.data.loader import StreamFeed
from otcclip.data.stream import PairStream
from otcclip.train import Callback, TrainConfig, train

THREADS = 1
PAIRS, SHARD, BATCH = 256, 32, 32  # 8 shards; 2 workers x 4 batches: 8 steps an epoch


def _config(source: Path | None, **kw) -> TrainConfig:
    """The tiny streamed run on `source`; with None, the same settings in memory."""
    base = {
        "data": None if source is None else str(source),
        "stream": source is not None,
        "defense": "none",
        "model": "otc-vit-tiny",
        "epochs": 2,
        "batch_size": BATCH,
        "workers": 2,
        "progress": False,
        "log_every": 1,
        "threads": THREADS,
    }
    base.update(kw)
    return TrainConfig(**base)


def _write(folder: Path) -> Path:
    write_shards(fashion_scenes(PAIRS, seed=0), folder, shard_size=SHARD)
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("data") / "shards")


def _stream_rows(shards: Path, table, world: int = 1):
    """The table rows of each epoch in the stream's order, predicted without decoding: for
    every step, each rank's local batch in rank order (the global batch)."""
    row = {int(i): r for r, i in enumerate(table.ids)}
    feeds = [
        StreamFeed(
            PairStream(shards, seed=0, rank=r, world_size=world),
            batch_size=BATCH,
            image_size=56,
            workers=2,
        )
        for r in range(world)
    ]

    def rows(epoch: int) -> np.ndarray:
        ids = np.concatenate([f.local_ids(epoch) for f in feeds], axis=1).ravel()
        return np.array([row[int(i)] for i in ids], dtype=np.int64)

    return rows


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"defense": "safeclip"}, "needs --safeclip-passes mixed"),
        ({"defense": "otcclip", "round_embeddings": "model"}, "needs --round-embeddings training"),
        (
            {"defense": "otcclip", "round_embeddings": "training", "on_doubt": "repair"},
            "needs --on-doubt drop",
        ),
        (
            {"defense": "otcclip", "round_embeddings": "training", "warmup_epochs": 0},
            "needs --warmup-epochs >= 1",
        ),
        ({"data": None, "scenes": 64}, "--scenes builds its pairs in memory"),
        ({"workers": -1}, "workers must be an integer >= 0"),
        ({"prefetch": 0}, "prefetch must be an integer >= 1"),
    ],
)
def test_what_cannot_stream_is_refused_before_training(change, message):
    with pytest.raises(ValueError, match=message):
        _config(Path("shards"), **change).validate()


def test_the_command_documents_and_checks_the_stream(tmp_path, shards):
    runner = CliRunner()
    wide = runner.invoke(main, ["train", "--help"], terminal_width=1000).output
    help_text = " ".join(wide.split())  # one line: no flag is cut at a line break
    for flag in (
        "--stream",
        "--workers",
        "--prefetch",
        "--round-embeddings training",
        "--safeclip-passes mixed",
        "--state-on-disk",
    ):
        assert flag in help_text
    # the kept rounds are the default, the only rounds a stream can run
    assert "(model; the paper's rule, --doubt match, needs it). [default: training]" in help_text
    # the command's default defense is otcclip: the refusal names the fix
    args = ["train", "--data", str(shards), "--stream", "--out", str(tmp_path / "run")]
    result = runner.invoke(main, [*args, "--round-embeddings", "model"])
    assert result.exit_code == 2 and "needs --round-embeddings training" in result.output
    csv = tmp_path / "pairs.csv"
    csv.write_text("filepath,title\na.png,a bag\n")
    args = ["train", "--data", str(csv), "--stream", "--defense", "none"]
    result = runner.invoke(main, [*args, "--out", str(tmp_path / "csv")])
    assert result.exit_code == 1 and "write it as shards first" in result.output


# --------------------------------------------------------------------------- the same training


def test_streaming_trains_as_memory_does_on_the_same_batches(shards):
    """Workers decode and preprocess; the trainer holds nothing but the batch. Fed the
    stream's order (predicted from the rule, without DataLoader), the in-memory trainer
    takes the same steps; in its own order it does not (the order is what is compared)."""
    streamed = train(_config(shards))
    table = read_pairs(shards)
    same_order = train(_config(None, scenes=1), table=table, epoch_rows=_stream_rows(shards, table))
    own_order = train(_config(None, scenes=1), table=table)
    assert len(streamed.step_losses) == 2 * PAIRS // BATCH
    np.testing.assert_allclose(streamed.step_losses, same_order.step_losses, rtol=0, atol=1e-6)
    assert not np.allclose(streamed.step_losses, own_order.step_losses, rtol=0, atol=1e-4)
    assert streamed.metrics[-1]["pairs"] == PAIRS
    for result in (streamed, same_order):
        _assert_data_wait(result.metrics)


def test_roclip_streams_as_memory_does_on_the_same_batches(shards):
    """RoCLIP's bank fills from the batches just trained, so it needs no table: streamed,
    it takes the steps the in-memory RoCLIP takes on the same batches, its second epoch
    pairing each image with its nearest bank caption."""
    kw = {"defense": "roclip", "warmup_epochs": 1, "match_every": 1, "bank_size": 64}
    streamed = train(_config(shards, **kw))
    table = read_pairs(shards)
    rows = _stream_rows(shards, table)
    same_order = train(_config(None, scenes=1, **kw), table=table, epoch_rows=rows)
    np.testing.assert_allclose(streamed.step_losses, same_order.step_losses, rtol=0, atol=1e-5)
    epochs = [m for m in streamed.metrics if "phase" in m]
    assert [m["phase"] for m in epochs] == ["clip", "nearest"]
    assert epochs[-1]["defense"]["bank_fill"] == 64  # filled by the first epoch's batches


# no pixel signal fused: the warm-up is not screened, so it trains as the in-memory run
# without rounds does (the round still reads the pixel pass's copies)
_OTC_STREAM = {
    "defense": "otcclip",
    "round_embeddings": "training",
    "warmup_epochs": 1,
    "match_every": 1,
    "k": 8,
    "doubt_signals": "cross,consistency_caption,consistency_image",
}


def test_otcclip_streams_its_rounds_from_the_kept_embeddings(tmp_path, shards):
    """The warm-up trains as the in-memory OTCCLIP does on the same batches (L_inter
    included). The round then judges every pair streamed, from the embeddings the
    training pass kept by id; the pairs it doubts stream past masked out of the losses
    and are named in the checkpoint's state."""
    streamed = train(_config(shards, out=str(tmp_path / "run"), **_OTC_STREAM))
    table = read_pairs(shards)
    rows = _stream_rows(shards, table)
    # no round in memory: epoch_rows would hand it the rows its round left out
    no_round = {**_OTC_STREAM, "match_every": 0}
    memory = train(_config(None, scenes=1, **no_round), table=table, epoch_rows=rows)
    warm = PAIRS // BATCH
    np.testing.assert_allclose(
        streamed.step_losses[:warm], memory.step_losses[:warm], rtol=0, atol=1e-5
    )
    epochs = [m for m in streamed.metrics if "phase" in m]
    assert [m["phase"] for m in epochs] == ["warmup", "matched"]
    report = epochs[1]["defense"]
    assert report["round"] == 1 and report["judged"] == PAIRS
    assert report["oldest_embedding_epoch"] == 0
    assert np.ceil(0.005 * PAIRS) <= report["sitting_out"] <= 0.25 * PAIRS
    state = load_checkpoint(tmp_path / "run").state["defense"]["streamed"]
    left_out = np.asarray(state["left_out"], bool)
    assert int(left_out.sum()) == report["sitting_out"]
    assert sorted(np.asarray(state["slots"]["ids"]).tolist()) == sorted(table.ids.tolist())


_FILTER_STREAM = {"defense": "filter", "warmup_epochs": 1, "filter_max_share": 0.2}


def test_filter_streams_from_the_kept_embeddings(tmp_path, shards):
    """Filter-then-train on a stream: the warm-up is plain CLIP (the in-memory run's steps
    on the same batches); the filter then scores every pair streamed from the image
    embeddings the training pass kept, and the dropped stream past masked out."""
    streamed = train(_config(shards, out=str(tmp_path / "run"), **_FILTER_STREAM))
    table = read_pairs(shards)
    plain = train(_config(None, scenes=1), table=table, epoch_rows=_stream_rows(shards, table))
    warm = PAIRS // BATCH
    np.testing.assert_allclose(
        streamed.step_losses[:warm], plain.step_losses[:warm], rtol=0, atol=1e-5
    )
    assert not np.allclose(streamed.step_losses[warm:], plain.step_losses[warm:], atol=1e-5)
    epochs = [m for m in streamed.metrics if "phase" in m]
    assert [m["phase"] for m in epochs] == ["warmup", "filtered"]
    report = epochs[1]["defense"]
    assert report["judged"] == PAIRS and 0 < report["dropped"] <= 0.2 * PAIRS
    state = load_checkpoint(tmp_path / "run").state["defense"]
    left_out = np.asarray(state["streamed"]["left_out"], bool)
    assert int(left_out.sum()) == report["dropped"] == int((~np.asarray(state["kept"])).sum())


def test_the_state_on_disk_trains_as_the_state_in_memory(tmp_path, shards):
    """--state-on-disk: the streamed filter's kept embeddings and slots live in
    memory-mapped files in the run's folder; the run is the in-memory one, step by step."""
    memory = train(_config(shards, out=str(tmp_path / "memory"), **_FILTER_STREAM))
    disk = train(_config(shards, out=str(tmp_path / "disk"), state_on_disk=True, **_FILTER_STREAM))
    np.testing.assert_array_equal(disk.step_losses, memory.step_losses)
    files = sorted(p.name for p in (tmp_path / "disk" / "matching-state" / "rank0").iterdir())
    assert files == ["caption.npy", "caption_epoch.npy", "image.npy", "image_epoch.npy"]
    assert not (tmp_path / "memory" / "matching-state").exists()
    with pytest.raises(ValueError, match="state_on_disk keeps the per-pair state"):
        _config(shards, state_on_disk=True, **_FILTER_STREAM).validate()


_SAFE_STREAM = {"defense": "safeclip", "safeclip_passes": "mixed", "epochs": 3}


def test_safeclip_streams_its_split_from_the_kept_embeddings(tmp_path, shards):
    """SafeCLIP on a stream (mixed passes): the unimodal warm-up and the low-rate CLIP
    epoch train as in memory on the same batches; the split then reads the cosines of the
    embeddings the training pass kept, for every pair streamed."""
    streamed = train(_config(shards, out=str(tmp_path / "run"), **_SAFE_STREAM))
    table = read_pairs(shards)
    rows = _stream_rows(shards, table)
    memory = train(_config(None, scenes=1, **_SAFE_STREAM), table=table, epoch_rows=rows)
    before = 2 * PAIRS // BATCH  # the split does not touch the first two epochs
    np.testing.assert_allclose(
        streamed.step_losses[:before], memory.step_losses[:before], rtol=0, atol=1e-5
    )
    epochs = [m for m in streamed.metrics if "phase" in m]
    assert [m["phase"] for m in epochs] == ["unimodal", "clip_low_lr", "mixed"]
    report = epochs[2]["defense"]
    assert report["judged"] == PAIRS and 0 < report["safe"] < PAIRS
    state = load_checkpoint(tmp_path / "run").state["defense"]
    assert int(np.asarray(state["safe"], bool).sum()) == report["safe"]


_STREAMED_DEFENSES = {
    "none": {},
    "otcclip": _OTC_STREAM,
    "filter": {**_FILTER_STREAM, "state_on_disk": True},  # resumes into its files too
    "safeclip": _SAFE_STREAM,
}


def test_streamed_otcclip_screens_and_judges_by_the_pixels_of_one_pass(tmp_path, capsys):
    """With the default signals a streamed run reads every image once before training
    (`otcclip.stream_pixels`): the warm-up's screen leaves a patch trigger's pairs out,
    the round judges with the pixel signals too, and the evidence is in the checkpoint."""
    table = fashion_scenes(PAIRS, seed=1)
    patched = np.arange(40, 48)
    checker = (np.indices((6, 6)).sum(axis=0) % 2 * 255).astype(np.uint8)
    table.images[patched, 45:51, 45:51] = checker
    folder = tmp_path / "shards"
    write_shards(table, folder, shard_size=SHARD)
    kw = {k: v for k, v in _OTC_STREAM.items() if k != "doubt_signals"}

    class Plans(Callback):
        def __init__(self) -> None:
            self.seen: list[tuple[int, dict, float]] = []

        def on_epoch_start(self, ctx, epoch, info, seconds) -> None:
            self.seen.append((epoch, dict(info), seconds))

    plans = Plans()
    stale = tmp_path / "run" / ".pixel-pass-rank0-killed"  # what a killed pass left
    stale.mkdir(parents=True)
    (stale / "pixel-pass.grey").write_bytes(b"\0" * 1024)
    result = train(_config(folder, out=str(tmp_path / "run"), **kw), [plans])
    assert not list((tmp_path / "run").glob(".pixel-pass-*"))
    assert "pixel pass: 256 images of 56x56 px" in capsys.readouterr().err
    epochs = [m for m in result.metrics if "phase" in m]
    assert epochs[0]["defense"]["screened"] >= len(patched)
    # a callback hears each plan as it is made: the screen (after the pass), then the round
    assert [(e, "screened" in i, "judged" in i) for e, i, _ in plans.seen] == [
        (0, True, False),
        (1, False, True),
    ]
    assert all(seconds > 0 for *_, seconds in plans.seen)
    state = load_checkpoint(tmp_path / "run").state["defense"]
    ids = np.asarray(state["streamed"]["slots"]["ids"])
    trigger = np.isin(ids, table.ids[patched])
    assert np.asarray(state["screened"], bool)[trigger].all()
    assert np.asarray(state["streamed"]["left_out"], bool)[trigger].all()
    assert np.asarray(state["pixels"]["keys"]).shape[0] == PAIRS


def _assert_data_wait(metrics: list[dict]) -> None:
    """Each epoch records the part of its step time spent waiting for batches."""
    for m in metrics:
        assert 0 < m["data_seconds"] < m["seconds"], m
        assert m["data_wait_share"] == pytest.approx(m["data_seconds"] / m["seconds"])


def test_a_corrupt_image_stops_training_naming_its_id(tmp_path):
    folder = _write(tmp_path / "shards")
    shard = folder / "00003.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first = members[0][0]  # a .png: write_shards writes each pair's image first
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in members:
            if member is first:
                data = data[: len(data) // 2]
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    bad = int(first.name.split(".")[0])
    with pytest.raises(DataError, match=rf"00003.tar: id {bad}: cannot decode"):
        train(_config(folder))


def test_the_poison_manifest_of_a_shard_directory_drives_evaluation(tmp_path):
    runner = CliRunner()
    data = tmp_path / "poisoned"
    line = f"poison --out {data} --scenes 128 --attack badnet --n-poison 8 --format shards"
    assert runner.invoke(main, line.split()).exit_code == 0
    args = ["train", "--data", str(data), "--stream", "--defense", "none", "--epochs", "1"]
    args += ["--batch-size", "32", "--workers", "1", "--eval-size", "20", "--no-progress"]
    args += ["--threads", str(THREADS), "--out", str(tmp_path / "run")]
    result = runner.invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert '"backdoor_asr": ' in result.output and '"backdoor_asr": null' not in result.output


# --------------------------------------------------------------------------- SIGKILL, resume

_KILL_AT = 13  # epoch 2, step 5: the last checkpoint (every 3 steps) is at step 3, worker 1's


@pytest.mark.slow
@pytest.mark.parametrize("defense", ["none", "otcclip", "filter", "safeclip"])
def test_sigkill_mid_epoch_then_resume_ends_like_an_uninterrupted_stream(
    tmp_path, shards, defense, capsys
):
    """With otcclip the kill falls in the matched epoch: the kept embeddings, the slots,
    the pixel evidence and the pairs left out come back with the checkpoint; with the
    filter (its state on disk), in the filtered epoch: the pairs it dropped; with SafeCLIP,
    in the low-rate epoch: the embeddings its next split reads."""
    kw = _STREAMED_DEFENSES[defense]
    killed, marker = tmp_path / "killed", tmp_path / "reached"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, __file__, "kill", str(shards), str(killed), str(marker), defense],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 600  # a liveness bound (loaded machines are slow)
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = load_checkpoint(killed)
    assert saved is not None and (saved.state["epoch"], saved.state["step"]) == (1, 3)
    assert saved.state["stream"]["workers"] == 2 and saved.state["stream"]["world_size"] == 1
    assert 0 < saved.state["data_seconds"] < saved.state["seconds"]

    with pytest.raises(DataError, match="resume with --workers 2"):
        train(_config(shards, out=str(killed), resume=True, checkpoint_every=3, workers=1, **kw))
    capsys.readouterr()
    resumed = train(_config(shards, out=str(killed), resume=True, checkpoint_every=3, **kw))
    assert "pixel pass" not in capsys.readouterr().err  # the evidence came with the state
    reference = train(_config(shards, out=str(tmp_path / "reference"), checkpoint_every=3, **kw))
    if defense == "otcclip":
        assert "pixel pass: 256 images" in capsys.readouterr().err
    assert not list(killed.glob(".pixel-pass-*"))
    np.testing.assert_allclose(resumed.step_losses, reference.step_losses, rtol=0, atol=1e-6)
    _assert_data_wait(resumed.metrics)  # the killed run's wait carried over to its epoch
    ref_state = reference.bundle.model.state_dict()
    for name, value in resumed.bundle.model.state_dict().items():
        torch.testing.assert_close(value, ref_state[name], rtol=0, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(mode: str, shards: Path, out: Path) -> None:
    """This file's worker `mode` on two gloo processes (see the bottom)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        __file__, mode, str(shards), str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.mark.slow
def test_two_processes_stream_the_global_batches_the_rule_deals_them(tmp_path, shards):
    """Two processes read disjoint units (another order than one process's, by design);
    their global batches, each rank's local batch in rank order, train as one process
    in memory trains on those batches."""
    out = tmp_path / "ddp.npz"
    _torchrun("ddp", shards, out)
    table = read_pairs(shards)
    rows = _stream_rows(shards, table, world=2)
    single = train(_config(None, scenes=1, device="cpu"), table=table, epoch_rows=rows)
    with np.load(out) as two:
        np.testing.assert_allclose(two["losses"], single.step_losses, rtol=1e-4, atol=1e-5)
        for name, value in single.bundle.model.state_dict().items():
            np.testing.assert_allclose(two[f"w.{name}"], value.numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_two_processes_stream_otcclip_to_one_verdict(tmp_path, shards):
    """Each process keeps the gathered batch's embeddings, so both hold the same state and
    their rounds leave out the same pairs, which every rank then masks alike. The two
    processes of the node share one pixel pass."""
    out = tmp_path / "ddp-otc.npz"
    _torchrun("ddp-otc", shards, out)
    with np.load(out) as both:
        assert both["judged"].tolist() == [PAIRS, PAIRS]
        np.testing.assert_array_equal(both["ids0"], both["ids1"])
        np.testing.assert_array_equal(both["left_out0"], both["left_out1"])
        assert 0 < both["left_out0"].sum() <= 0.25 * PAIRS
        # one pixel pass for the node: local rank 1 loaded local rank 0's, nothing is left
        assert both["loaded"].tolist() == [0.0, 1.0] and int(both["left_behind"]) == 0


# --------------------------------------------------------------------------- workers


class _PauseAt(Callback):
    """Announce reaching a step, then wait to be killed (a run mid-epoch)."""

    def __init__(self, step: int, marker: Path) -> None:
        self.step = step
        self.marker = marker

    def on_step_end(self, ctx, info) -> None:
        if info["global_step"] == self.step:
            self.marker.write_text("reached")
            time.sleep(600)


def _kill_worker(shards: str, run: str, marker: str, defense: str) -> None:
    torch.set_num_threads(THREADS)
    config = _config(Path(shards), out=run, checkpoint_every=3, **_STREAMED_DEFENSES[defense])
    train(config, [_PauseAt(_KILL_AT, Path(marker))])


def _ddp_worker(shards: str, out: str) -> None:
    from otcclip import distributed as dist

    torch.set_num_threads(THREADS)
    dist.init_from_env("gloo")
    result = train(_config(Path(shards), device="cpu"))
    if dist.is_main():
        weights = {f"w.{k}": v.numpy() for k, v in result.bundle.model.state_dict().items()}
        np.savez(out, losses=np.array(result.step_losses), **weights)
    dist.barrier()
    dist.destroy()


def _ddp_otc_worker(shards: str, out: str) -> None:
    """Streamed OTCCLIP on two processes; each rank's round state, gathered to rank 0."""
    from otcclip import distributed as dist
    from otcclip.defenses import OTCCLIPDefense

    torch.set_num_threads(THREADS)
    dist.init_from_env("gloo")
    defenses = []
    plan = OTCCLIPDefense.stream_plan

    def stream_plan(self, ctx, epoch):
        defenses.append(self)
        return plan(self, ctx, epoch)

    OTCCLIPDefense.stream_plan = stream_plan  # to read this rank's defense after training
    run = Path(out).with_suffix("")  # with --out, the node's processes share one pixel pass
    result = train(_config(Path(shards), device="cpu", out=str(run), **_OTC_STREAM))
    state = defenses[-1].streamed
    judged = result.metrics[-1]["defense"]["judged"]
    loaded = defenses[-1].pixel_pass["pixel_pass_loaded"]
    parts = dist.all_gather_object((judged, state.slots.ids, state.left_out, loaded))
    if dist.is_main():
        np.savez(
            out,
            judged=np.array([p[0] for p in parts]),
            ids0=parts[0][1], ids1=parts[1][1], left_out0=parts[0][2], left_out1=parts[1][2],
            loaded=np.array([p[3] for p in parts]),
            left_behind=np.array(len(list(run.glob(".pixel-pass-*")))),
        )  # fmt: skip
    dist.barrier()
    dist.destroy()


if __name__ == "__main__":
    if sys.argv[1] == "kill":
        _kill_worker(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
    elif sys.argv[1] == "ddp":
        _ddp_worker(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "ddp-otc":
        _ddp_otc_worker(sys.argv[2], sys.argv[3])
