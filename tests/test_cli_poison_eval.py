"""`otcclip poison` and `otcclip eval` as a user runs them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from otcclip.attacks import load_manifests
from otcclip.cli import main
from otcclip.data import PairTable, fashion_scenes, read_pairs, write_pairs


def _run(*args: object):
    """Invoke the CLI; a single string argument is split on spaces like a shell line."""
    argv = str(args[0]).split() if len(args) == 1 else [str(a) for a in args]
    return CliRunner().invoke(main, argv, catch_exceptions=False)


def test_poison_writes_data_manifest_targets_and_a_summary(tmp_path):
    out = tmp_path / "poisoned"
    attacks = "--attack targeted --attack badnet --attack adaptive"
    sizes = "--n-targets 2 --n-captions 5 --n-poison 20 --seed 3"
    r = _run(f"poison --out {out} --scenes 300 {attacks} {sizes}")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "targets.npz",
        "train.parquet",
    ]
    table = read_pairs(out / "train.parquet")
    assert len(table) == 310
    manifests, data = load_manifests(out)
    assert [m.attack for m in manifests] == ["targeted", "badnet", "adaptive"]
    assert data["source"] == "fashion-scenes" and data["n"] == 300 and data["n_rows"] == 310
    assert manifests[0].target_images.shape == (2, 56, 56)
    assert all(m.poison_rate == pytest.approx(m.n_poison / 310) for m in manifests)
    ids = [set(m.poisoned_ids) for m in manifests]
    assert not (ids[0] & ids[1] or ids[1] & ids[2] or ids[0] & ids[2])
    # The clean part is exactly fashion_scenes with the same seed, bar the poisoned ids.
    clean = fashion_scenes(300, seed=3)
    untouched = ~np.isin(clean.ids, list(ids[1] | ids[2]))
    np.testing.assert_array_equal(table.images[:300][untouched], clean.images[untouched])
    assert "badnet" in r.output and "targeted" in r.output and "all" in r.output.splitlines()[-1]
    # Same command, same seed: the same bytes.
    r2 = _run(f"poison --out {tmp_path / 'again'} --scenes 300 {attacks} {sizes}")
    assert r2.exit_code == 0
    again = read_pairs(tmp_path / "again" / "train.parquet")
    np.testing.assert_array_equal(again.images, table.images)
    assert again.captions == table.captions


def test_poison_reads_user_data_and_options(tmp_path):
    write_pairs(fashion_scenes(120, seed=1), tmp_path / "mine.parquet")
    out = tmp_path / "out"
    data = tmp_path / "mine.parquet"
    options = "--n-poison 5% --param alpha=0.1 --label-consistent --target-label sneaker"
    r = _run(f"poison --out {out} --data {data} --attack blended {options}")
    assert r.exit_code == 0, r.output
    (m,), data = load_manifests(out)
    assert m.trigger["alpha"] == 0.1 and m.params["label_consistent"] and m.n_poison == 6
    assert data["source"].endswith("mine.parquet") and data["read_report"]["n_dropped"] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--attack", "trojan"], "Invalid value for '--attack'"),
        (["--attack", "badnet", "--target-label", "pizza"], "unknown class label 'pizza'"),
        (["--attack", "badnet", "--n-poison", "1.5"], "poison rate must be in (0, 1]"),
        (["--attack", "badnet", "--n-poison", "many"], "neither a count"),
        (["--attack", "badnet", "--n-poison", "500"], "only"),
        (["--attack", "badnet", "--param", "alpha=0.3"], "apply to none of the triggers"),
        (["--attack", "targeted", "--label-consistent"], "badnet/blended/sig/wanet only"),
        (["--attack", "badnet", "--fashion-mnist", "/nonexistent"], "dataset-fashion-mnist"),
        (["--attack", "badnet", "--data", "/nonexistent/x.parquet"], "no parquet data"),
        (["--data", "x.parquet", "--scenes", "200"], "--data or --scenes, not both"),
        (["--attack", "badnet", "--n-poison", "0.0001"], "is 0.02 samples, less than one"),
        (
            ["--attack", "targeted", "--n-targets", "100000"],
            "100000 target images asked for",
        ),
    ],
)
def test_poison_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    scenes = [] if "--data" in args else ["--scenes", "200"]
    r = _run("poison", "--out", out, *scenes, *args)
    assert r.exit_code != 0
    assert message in r.output
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary leftovers either


def test_poison_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = _run("poison", "--out", out, "--scenes", 100, "--attack", "sig", "--n-poison", 3)
    assert r.exit_code != 0 and "--force" in r.output
    assert (out / "keep.txt").read_text() == "mine"
    r = _run("poison", "--out", out, "--scenes", 100, "--attack", "sig", "--n-poison", 3, "--force")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train.parquet"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_poison_refuses_a_file_as_out(tmp_path, force):
    """--force used to rename the file to a hidden .tmp.old leftover and exit 0."""
    out = tmp_path / "out"
    out.write_text("mine")
    r = _run("poison", "--out", out, "--scenes", 50, "--attack", "sig", "--n-poison", 3, *force)
    assert r.exit_code == 2
    assert "is a file; the output is a folder (--force replaces only a folder)" in r.output
    assert out.read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    r = _run("poison", "--out", out / "sub", "--scenes", 50, "--attack", "sig", "--n-poison", 3)
    assert r.exit_code == 2 and "is a file, so" in r.output


def test_eval_checkpoint_on_a_poisoned_directory(tmp_path):
    models = pytest.importorskip("otcclip.models")
    poison = tmp_path / "p"
    attacks = "--attack targeted --attack badnet --n-targets 2 --n-captions 3 --n-poison 10"
    r = _run(f"poison --out {poison} --scenes 200 {attacks}")
    assert r.exit_code == 0, r.output
    bundle = models.create_model("otc-vit-tiny", seed=0)
    weights = tmp_path / "w.safetensors"
    models.save_weights(bundle, weights)
    train = read_pairs(poison / "train.parquet")
    changed = np.zeros(len(train), bool)
    changed[:7] = True
    import pyarrow as pa
    import pyarrow.parquet as pq

    matched = tmp_path / "matched.parquet"
    pq.write_table(
        pa.table({"id": train.ids, "caption": train.captions, "changed": changed}), matched
    )
    sizes = "--n-zero-shot 40 --n-probe-train 40 --n-probe-test 20 --n-retrieval 30 --batch-size 16"
    r = _run(
        f"eval --checkpoint {weights} --poison-dir {poison} --matching {matched} "
        f"--json {tmp_path / 'r.json'} {sizes} --device cpu"
    )
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["model"] == "otc-vit-tiny" and result["image_size"] == 56
    assert [a["attack"] for a in result["attacks"]] == ["targeted", "badnet"]
    assert result["reassignment"]["n_changed"] == 7 and result["reassignment"]["precision"] == 0.0
    lines = ("zero-shot top-1", "linear probe", "targeted ASR -> bag", "backdoor ASR badnet -> bag")
    for line in (*lines, "image->text", "re-assignment precision"):
        assert line in r.output


def test_eval_bad_input(tmp_path):
    r = _run("eval", "--checkpoint", tmp_path / "absent.safetensors")
    assert r.exit_code != 0 and "no such file" in r.output
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    r = _run(
        "eval", "--checkpoint", tmp_path / "junk.safetensors", "--matching", tmp_path / "m.parquet"
    )
    assert r.exit_code != 0 and "--matching needs --poison-dir" in r.output


def test_eval_json_path_is_checked_before_any_work(tmp_path, monkeypatch):
    """--json <folder> used to give a traceback after the whole evaluation."""
    import otcclip.evaluate

    monkeypatch.setattr(otcclip.evaluate, "evaluate", lambda *a, **k: pytest.fail("work started"))
    (tmp_path / "w.safetensors").write_bytes(b"junk")
    (tmp_path / "report").mkdir()
    r = _run("eval", "--checkpoint", tmp_path / "w.safetensors", "--json", tmp_path / "report")
    assert r.exit_code == 2
    assert "Invalid value for --json" in r.output and "is a directory; give a file name" in r.output
    r = _run(
        "eval", "--checkpoint", tmp_path / "w.safetensors", "--json", tmp_path / "w.safetensors"
    )
    assert r.exit_code == 2 and "is the --checkpoint input" in r.output
    assert (tmp_path / "w.safetensors").read_bytes() == b"junk"


def test_pair_table_survives_the_cli_round_trip(tmp_path):
    # What `otcclip poison` writes is what the trainer reads back: ids, classes, captions.
    t = fashion_scenes(50, seed=9)
    write_pairs(t, tmp_path / "a.parquet")
    back: PairTable = read_pairs(tmp_path / "a.parquet")
    np.testing.assert_array_equal(back.caption_classes, t.caption_classes)


def test_eval_val_size_scores_a_saved_model_as_its_run_scored_it(tmp_path):
    """The tuning metric of a saved model: `eval --val-size` draws the run's validation split."""
    from types import SimpleNamespace

    models = pytest.importorskip("otcclip.models")
    from otcclip.evaluate import EpochEvaluation

    bundle = models.create_model("otc-vit-tiny", seed=3)
    weights = tmp_path / "w.safetensors"
    models.save_weights(bundle, weights)
    run = EpochEvaluation(every=1, epochs=1, eval_size=40, probe_size=0, seed=2, val_size=60)
    ctx = SimpleNamespace(
        is_main=True, bundle=bundle, manifests=[], table=fashion_scenes(8, image_size=56)
    )
    run.on_train_start(ctx)
    recorded = run.on_epoch_end(ctx, 0, {})["eval"]
    r = _run(
        f"eval --checkpoint {weights} --seed 2 --n-zero-shot 40 --n-probe-train 0 "
        f"--n-retrieval 0 --val-size 60 --json {tmp_path / 'r.json'} --device cpu"
    )
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["n_val"] == recorded["n_val"] == 60
    assert result["val_zero_shot_top1"] == recorded["val_zero_shot_top1"]
    assert "validation zero-shot top-1" in r.output
    # the split never holds a reported image
    assert set(run.validation.ids).isdisjoint(run.sets[0].ids)
