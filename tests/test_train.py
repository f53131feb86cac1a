"""The training loop: schedules, early refusals, every defense, SIGKILL + resume, two processes.

The slow tests train the tiny built-in model for a few epochs on a few hundred
fashion-scenes. This file is also the worker script of two of them (see the
bottom): a run that a test kills with SIGKILL in the middle of an epoch, and the
torchrun workers of the two-process comparison.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from otcclip.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from otcclip.train import (
    Callback,
    TrainConfig,
    cosine_lr,
    epoch_order,
    train,
)

THREADS = 1


def _tiny(**kw) -> TrainConfig:
    base = {
        "scenes": 192,
        "model": "otc-vit-tiny",
        "epochs": 2,
        "batch_size": 32,
        "progress": False,
        "log_every": 1,
        "threads": THREADS,
        "match_batch": 64,
    }
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------- fast


def test_cosine_schedule_warms_up_then_decays_to_zero():
    lrs = [cosine_lr(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert cosine_lr(100, 100, 10, 1.0) == pytest.approx(0.0)


def test_data_order_is_a_pure_function_of_seed_and_epoch():
    rows = np.arange(10, 60)
    a = epoch_order(3, 1, rows)
    assert np.array_equal(a, epoch_order(3, 1, rows))
    assert sorted(a.tolist()) == rows.tolist()
    assert not np.array_equal(a, epoch_order(3, 2, rows))
    assert not np.array_equal(a, epoch_order(4, 1, rows))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"defense": "magic"}, "unknown defense 'magic'"),
        ({"scenes": None}, "exactly one data source"),
        ({"data": "x.parquet"}, "exactly one data source"),
        ({"batch_size": 1}, "batch_size"),
        ({"precision": "fp16"}, "needs a CUDA device"),
        ({"alpha": 1.5}, "alpha"),
        ({"resume": True}, "resume needs"),
        ({"defense": "otcclip", "capacity": 3}, "only meaningful with method 'capacity'"),
        ({"defense": "otcclip", "k": 500}, "only 192 captions"),
        ({"defense": "safeclip", "safe_start": 2.0}, "safe_start"),
        ({"defense": "otcclip", "ot_duplicate_cos": 1.5}, "ot_duplicate_cos"),
        ({"defense": "otcclip", "max_repair": -0.1}, "max_repair"),
        ({"defense": "otcclip", "doubt_phase_scale": "z"}, "doubt_phase_scale must be one of"),
        ({"defense": "otcclip", "doubt_phase_template": "x"}, "doubt_phase_template must be"),
    ],
)
def test_bad_settings_are_refused_before_training(change, message, tmp_path):
    if change.get("precision") == "fp16" and torch.cuda.is_available():
        pytest.skip("fp16 is a valid setting where CUDA is present")
    config = _tiny(**change)
    if "resume" not in change:
        config.out = str(tmp_path / "run")
    with pytest.raises(ValueError, match=message):
        train(config)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_more_processes_than_gpus_is_a_clear_error():
    from otcclip.train import _check_cuda_index

    beyond = torch.device("cuda", torch.cuda.device_count())
    with pytest.raises(ValueError, match="process\\(es\\) per node, or train on the CPU"):
        _check_cuda_index(beyond)
    assert _check_cuda_index(torch.device("cpu")) == torch.device("cpu")


def test_bad_data_and_models_are_refused_before_training(tmp_path):
    from otcclip.attacks import Manifest
    from otcclip.data import fashion_scenes

    with pytest.raises(FileNotFoundError, match="no training data"):
        train(_tiny(scenes=None, data=str(tmp_path / "missing.parquet")))
    table = fashion_scenes(40, seed=0)
    with pytest.raises(ValueError, match="no samples"):
        train(_tiny(), table=table.subset(np.arange(0)))
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(_tiny(batch_size=64), table=table)
    wrong = Manifest(attack="badnet", target_label=8, seed=0, poisoned_ids=[3, 10**9], params={})
    with pytest.raises(ValueError, match="manifest does not match the data"):
        train(_tiny(batch_size=8), table=table, manifests=[wrong])
    with pytest.raises(ValueError, match="no-such-model"):
        train(_tiny(model="no-such-model", batch_size=8), table=table)


def test_runs_are_not_overwritten_and_resume_checks_the_checkpoint(tmp_path):
    from otcclip.models import create_model

    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(_tiny(out=str(run), resume=True))
    bundle = create_model("otc-vit-tiny")
    config = _tiny(out=str(run))
    save_checkpoint(run, bundle, {"config": config.to_dict()}, global_step=1)
    with pytest.raises(ValueError, match="already holds a training run"):
        train(config)
    with pytest.raises(CheckpointError, match="holds model 'otc-vit-tiny'"):
        train(_tiny(out=str(run), resume=True, model="ViT-B-32"))
    with pytest.raises(CheckpointError, match="seed"):
        train(_tiny(out=str(run), resume=True, seed=5))


def test_tensorboard_is_optional_and_clear_when_missing(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install tensorboard"):
            train(_tiny(out=str(tmp_path), tensorboard=True, epochs=1))
    else:
        train(_tiny(out=str(tmp_path), tensorboard=True, epochs=1))
        assert list((tmp_path / "tensorboard").iterdir())


# --------------------------------------------------------------------------- every defense


def _assert_same_state(a: dict, b: dict, where: str = "") -> None:
    """The bank, the split state, the assignment, the pixel evidence ... equal, leaf by leaf."""
    assert a.keys() == b.keys(), where
    for key, value in a.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, b[key], err_msg=where + key)
        elif isinstance(value, dict):
            _assert_same_state(value, b[key], f"{where}{key}.")
        elif not isinstance(value, bytes):
            assert value == b[key], where + key


@pytest.mark.slow
@pytest.mark.parametrize("defense", ["none", "roclip", "safeclip", "otcclip"])
def test_every_defense_trains_and_records_its_work(defense, tmp_path):
    config = _tiny(defense=defense, out=str(tmp_path), warmup_epochs=1, match_every=1)
    result = train(config)
    assert [m["epoch"] for m in result.metrics] == [1, 2]
    steps = [m["steps"] for m in result.metrics]
    assert len(result.step_losses) == sum(steps) and steps[0] == 192 // 32
    if defense != "otcclip":
        assert steps[1] == 192 // 32
    assert all(np.isfinite(result.step_losses))
    phases = [m["phase"] for m in result.metrics]
    second = result.metrics[1]
    if defense == "none":
        assert phases == ["clip", "clip"] and set(second) >= {"clip", "loss", "lr"}
    elif defense == "roclip":
        assert phases == ["clip", "nearest"] and "nearest" in second
    elif defense == "safeclip":
        assert phases == ["unimodal", "clip_low_lr"] and "image_image" in result.metrics[0]
    else:
        assert phases == ["warmup", "matched"] and "inter" in second
        info = second["defense"]
        # max_repair (0.25) bounds the round; an untrained model doubts some pairs
        assert info["round"] == 1 and 0 < info["changed"] <= 192 // 4
        # on_doubt="drop" (default): the doubted pairs sit the matched epoch out
        assert info["sitting_out"] == info["changed"] == 192 - second["pairs"]
        assert steps[1] == second["pairs"] // 32
        assert result.assignment.shape == (192,)
        # the history holds round 0 (own captions) and round 1: a doubted pair changed once
        doubted = (result.assignment < 0).astype(int).tolist()
        assert [result.history.changes(i) for i in range(192)] == doubted
        assert sum(doubted) == info["changed"]
    for name in ("model.safetensors", "metrics.jsonl", "summary.json", "config.json"):
        assert (tmp_path / name).is_file(), name
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if x["event"] == "epoch"] == [1, 2]
    assert sum(x["event"] == "step" for x in lines) == sum(steps)


def test_the_epoch_line_says_whether_doubted_pairs_were_left_out_or_re_paired():
    from otcclip.train import _epoch_line

    base = {"epoch": 3, "phase": "matched", "loss": 1.0, "seconds": 2.0, "prepare_seconds": 1.0}
    dropped = _epoch_line({**base, "defense": {"changed": 5, "sitting_out": 5}})
    repaired = _epoch_line({**base, "defense": {"changed": 3, "sitting_out": 0}})
    assert "left out 5" in dropped and "re-paired" not in dropped
    assert "re-paired 3" in repaired and "left out" not in repaired


def test_the_epoch_line_shows_the_share_of_step_time_spent_waiting_on_data():
    from otcclip.train import _epoch_line

    base = {"epoch": 1, "loss": 1.0, "seconds": 2.0, "prepare_seconds": 0.0}
    assert "waiting on data 25%" in _epoch_line({**base, "data_wait_share": 0.25})
    assert "waiting on data" not in _epoch_line(base)  # metrics written before it was measured


def test_an_epoch_records_how_long_its_steps_waited_for_their_batches():
    result = train(_tiny(scenes=64, epochs=1, defense="none"))
    (m,) = result.metrics
    assert 0 < m["data_seconds"] < m["seconds"]
    assert m["data_wait_share"] == pytest.approx(m["data_seconds"] / m["seconds"])


@pytest.mark.slow
def test_safeclip_mixed_epochs_split_safe_from_risky(tmp_path):
    from otcclip.attacks import backdoor
    from otcclip.data import fashion_scenes

    clean = fashion_scenes(192, seed=0)
    poisoned, manifest = backdoor(clean, "badnet", 24, "bag", seed=1)
    config = _tiny(defense="safeclip", epochs=3, warmup_epochs=1, safe_start=0.5)
    result = train(config, table=poisoned, manifests=[manifest])
    mixed = result.metrics[2]
    info = mixed["defense"]
    assert mixed["phase"] == "mixed" and 0 < info["safe"] <= 96
    assert {"clip", "image_image", "text_text"} <= set(mixed)
    # the split is measured against the poison: safe + risky poison is all 24 of it
    in_safe = info["poison_in_safe"]
    assert 0 <= in_safe <= 24
    assert info["poison_risky_share"] == pytest.approx((24 - in_safe) / 24)


# --------------------------------------------------------------------------- the command


@pytest.mark.slow
def test_the_command_trains_on_a_poison_directory_and_resumes(tmp_path):
    from click.testing import CliRunner

    from otcclip.cli import main

    runner = CliRunner()
    poisoned = tmp_path / "poisoned"
    args = ["poison", "--out", str(poisoned), "--scenes", "160", "--attack", "badnet"]
    args += ["--target-label", "bag", "--n-poison", "8", "--seed", "0"]
    done = runner.invoke(main, args)
    assert done.exit_code == 0, done.output
    run = tmp_path / "run"
    common = ["--eval-size", "60", "--no-progress", "--threads", str(THREADS)]
    # a first invocation interrupted after its first epoch's checkpoint ...
    config = _tiny(
        scenes=None, data=str(poisoned), out=str(run), defense="otcclip", warmup_epochs=1,
        batch_size=32, eval_every=1,
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        train(config, [_Interrupt()])
    # ... is finished by `otcclip train --out RUN --resume`, with the run's own settings
    done = runner.invoke(main, ["train", "--out", str(run), "--resume", *common])
    assert done.exit_code == 0, done.output
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [x for x in lines if x["event"] == "epoch"]
    assert [x["epoch"] for x in epochs] == [1, 2] and epochs[1]["phase"] == "matched"
    assert epochs[1]["eval"]["backdoor_asr"] is not None  # the manifest gives a per-epoch ASR
    assert '"zero_shot_top1"' in done.output
    refused = runner.invoke(main, ["train", "--data", str(poisoned), "--out", str(run)])
    assert refused.exit_code != 0 and "already holds a training run" in refused.output
    refused = runner.invoke(main, ["train", "--out", str(run), "--resume", "--model", "RN50"])
    assert refused.exit_code != 0 and "holds model 'otc-vit-tiny'" in refused.output


class _Interrupt(Callback):
    """Stop a run right after its first epoch-end checkpoint."""

    def on_checkpoint(self, ctx, path, info):
        if info["epoch"] == 1 and info["step"] == 0:
            raise KeyboardInterrupt


# --------------------------------------------------------------------------- resume after SIGKILL

_KILL_CONFIGS = {
    "otcclip": {
        "defense": "otcclip",
        "epochs": 3,
        "warmup_epochs": 1,
        "match_every": 1,
        "checkpoint_every": 2,
        "log_every": 1,
    },
    # a step warm-up that ends mid-epoch 1; nearest-caption epochs 1..3 search the bank
    "roclip": {
        "defense": "roclip",
        "epochs": 3,
        "warmup_steps": 4,
        "match_every": 1,
        "augment": "text",
        "checkpoint_every": 2,
        "log_every": 1,
    },
    # unimodal for 3 steps, low lr to the end of epoch 1, split from epoch 2 (separate passes)
    "safeclip": {
        "defense": "safeclip",
        "epochs": 3,
        "warmup_steps": 3,
        "safe_schedule": "reference",
        "safe_threshold": 0.5,
        "safeclip_passes": "separate",
        "checkpoint_every": 2,
        "log_every": 1,
    },
}
# the default rounds read the training pass's embeddings (the kept state must resume
# exactly); the rounds that embed every pair again (the paper's rule needs them) too
_KILL_CONFIGS["otcclip-model"] = {**_KILL_CONFIGS["otcclip"], "round_embeddings": "model"}
_KILL_CONFIG = _KILL_CONFIGS["otcclip"]
# 6 steps an epoch; step checkpoints every 2 steps: the last one before global step 9
# (epoch 2, step 3, just after the first matching round) is at global step 8. SafeCLIP's
# first split is at the start of epoch 3: it is killed at epoch 3, step 3 (its mixed epoch
# has >= 5 whole batches of one group each).
_KILL_AT_STEP = 9
_KILL_AT = {
    "otcclip": _KILL_AT_STEP,
    "otcclip-model": _KILL_AT_STEP,
    "roclip": _KILL_AT_STEP,
    "safeclip": 15,
}


@pytest.mark.slow
@pytest.mark.parametrize("defense", ["otcclip", "otcclip-model", "roclip", "safeclip"])
def test_sigkill_mid_epoch_then_resume_ends_like_an_uninterrupted_run(defense, tmp_path):
    """A run killed mid-epoch (after a step checkpoint, with unsaved steps since) and
    resumed ends with the metrics and weights of a run that was never interrupted:
    OTCCLIP's assignment, RoCLIP's caption bank and SafeCLIP's split state included."""
    config = _KILL_CONFIGS[defense]
    killed = tmp_path / "killed"
    marker = tmp_path / "reached"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, __file__, "kill", str(killed), str(marker), defense],
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
    assert proc.returncode == -signal.SIGKILL
    saved = load_checkpoint(killed)
    assert saved is not None
    step, epoch = saved.state["global_step"], saved.state["epoch"]
    assert saved.state["step"] > 0 and step < _KILL_AT[defense], "killed at an epoch end"
    assert epoch == _KILL_AT[defense] // 6 and saved.state["plan"] is not None  # mid-epoch
    if defense == "roclip":
        assert saved.state["defense"]["count"] > 0 and saved.state["plan"]["phase"] == "nearest"
    if defense == "otcclip":  # the kept embeddings were written by this epoch's steps
        stamps = saved.state["defense"]["kept"]["image_epoch"]
        assert (stamps == epoch).any() and (stamps == epoch - 1).any()
    if defense == "safeclip":
        assert saved.state["plan"]["phase"] == "mixed"
        assert saved.state["defense"]["first_share"] is not None

    seen: dict[str, list] = {"resumed": [], "reference": []}
    resumed = train(_tiny(out=str(killed), resume=True, **config), [_DefenseState(seen["resumed"])])
    reference = train(
        _tiny(out=str(tmp_path / "reference"), **config), [_DefenseState(seen["reference"])]
    )
    np.testing.assert_allclose(resumed.step_losses, reference.step_losses, rtol=0, atol=1e-6)
    for a, b in zip(resumed.metrics, reference.metrics, strict=True):
        for key in ("loss", "clip", "inter", "nearest", "image_image", "lr"):
            assert a.get(key) == pytest.approx(b.get(key), abs=1e-6), key
        untimed = [{k: v for k, v in m["defense"].items() if "seconds" not in k} for m in (a, b)]
        assert untimed[0] == untimed[1]
    np.testing.assert_array_equal(resumed.assignment, reference.assignment)
    final = seen["resumed"][-1], seen["reference"][-1]
    _assert_same_state(*final)
    ref_state = reference.bundle.model.state_dict()
    for name, value in resumed.bundle.model.state_dict().items():
        torch.testing.assert_close(value, ref_state[name], rtol=0, atol=1e-6, msg=name)
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x)["global_step"] for x in lines if '"step"' in x.split(",")[0]]
    assert steps == sorted(set(steps))  # no step logged twice after the resume


# --------------------------------------------------------------------------- two processes

_DDP_CONFIG = {
    "device": "cpu",  # two gloo processes, also on a machine with one GPU
    "defense": "otcclip",
    "epochs": 2,
    "warmup_epochs": 1,
    "match_every": 1,
    "scenes": 128,
    "match_batch": 32,
    "margin": 0.0,  # re-pair freely: many changes to compare
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("rounds", ["model", "training"])
def test_two_processes_train_like_one_on_the_same_global_batch(rounds, tmp_path):
    """Same global batches, so the same loss curve (to float summation order) and,
    after the epoch-2 matching round, the same caption assignment; with the rounds from
    the training pass too (every process keeps the gathered batch's embeddings)."""
    out = tmp_path / "ddp.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        __file__, "ddp", str(out), rounds,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    single = train(_tiny(**_DDP_CONFIG, round_embeddings=rounds))
    with np.load(out) as two:
        np.testing.assert_allclose(two["losses"], single.step_losses, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(two["assignment"], single.assignment)
        weights = single.bundle.model.state_dict()
        for name, value in weights.items():
            np.testing.assert_allclose(two[f"w.{name}"], value.numpy(), rtol=1e-3, atol=1e-4)


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


class _DefenseState(Callback):
    """Keeps a copy of the defense's saved state at each epoch-end checkpoint."""

    def __init__(self, into: list) -> None:
        self.into = into

    def on_checkpoint(self, ctx, path, info) -> None:
        from otcclip.checkpoint import load_checkpoint

        if info["step"] == 0 and path is not None:
            saved = load_checkpoint(ctx.config.out)
            if saved is not None:
                self.into.append(dict(saved.state["defense"]))


def _kill_worker(run: str, marker: str, defense: str) -> None:
    torch.set_num_threads(THREADS)
    config = _KILL_CONFIGS[defense]
    train(_tiny(out=run, **config), [_PauseAt(_KILL_AT[defense], Path(marker))])


def _ddp_worker(out: str, rounds: str) -> None:
    from otcclip import distributed as dist

    torch.set_num_threads(THREADS)
    dist.init_from_env("gloo")
    result = train(_tiny(**_DDP_CONFIG, round_embeddings=rounds))
    if dist.is_main():
        weights = {f"w.{k}": v.numpy() for k, v in result.bundle.model.state_dict().items()}
        np.savez(out, losses=np.array(result.step_losses), assignment=result.assignment, **weights)
    dist.barrier()
    dist.destroy()


if __name__ == "__main__":
    if sys.argv[1] == "kill":
        _kill_worker(sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "ddp":
        _ddp_worker(sys.argv[2], sys.argv[3])


# --------------------------------------------------------------------------- a diverging run


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    """--lr 1e6 used to print 'loss nan', exit 0, save an all-NaN model and write bare NaN
    into metrics.jsonl (invalid JSON)."""
    from click.testing import CliRunner

    from otcclip.cli import main

    run = tmp_path / "run"
    args = ["train", "--scenes", "96", "--epochs", "2", "--batch-size", "32", "--lr", "1e6"]
    args += ["--defense", "none", "--out", str(run), "--eval-every", "0", "--no-progress"]
    args += ["--checkpoint-every", "1", "--log-every", "1", "--threads", str(THREADS)]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 1, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("Error: the loss is not finite (") and "lower --lr" in last
    assert "at epoch 1, step 2 (lr 1e+06)" in last  # this data and seed break at step 2
    assert not (run / "model.safetensors").exists() and not (run / "summary.json").exists()
    kept = load_checkpoint(run)  # the one of step 1: step 2's update broke the weights
    assert kept is not None and f"the last good checkpoint {kept.path} is kept" in last
    from otcclip.models import create_model

    bundle = create_model("otc-vit-tiny")
    kept.load_weights(bundle)
    assert all(torch.isfinite(p).all() for p in bundle.model.parameters())
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
        assert np.isfinite(json.loads(line)["loss"])


@pytest.mark.slow
def test_own_small_images_train_and_evaluate_at_the_model_size(tmp_path):
    """64x48 images used to stop with 'image_size must be an int >= 56, got 48'."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from click.testing import CliRunner
    from PIL import Image

    from otcclip.cli import main

    rng = np.random.default_rng(0)
    images = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 64), dtype=np.uint8)).save(buf, format="PNG")
        images.append(buf.getvalue())
    captions = [f"a photo of a {'shirt' if i % 2 else 'bag'}" for i in range(64)]
    pq.write_table(pa.table({"image": images, "caption": captions}), tmp_path / "own.parquet")
    args = ["train", "--data", str(tmp_path / "own.parquet"), "--epochs", "1"]
    args += ["--batch-size", "32", "--defense", "none", "--out", str(tmp_path / "run")]
    args += ["--eval-size", "20", "--no-progress", "--threads", str(THREADS)]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert '"zero_shot_top1": ' in r.output
