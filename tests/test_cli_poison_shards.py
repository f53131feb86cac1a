"""`otcclip poison --format shards`: one command writes fashion-scenes as webdataset shards,
and the other commands find the pairs in such a directory as they do train.parquet."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from otcclip.attacks import load_manifests
from otcclip.cli import main
from otcclip.data import PairStream, fashion_scenes, read_pairs, read_shard_index


def _run(line: str):
    return CliRunner().invoke(main, line.split(), catch_exceptions=False)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "scenes"
    result = _run(f"poison --out {out} --scenes 300 --format shards --shard-size 128 --seed 2")
    assert result.exit_code == 0, result.output
    assert "train/ (3 shards) (300 pairs)" in result.output
    return out


def test_clean_scenes_as_shards(clean):
    assert sorted(p.name for p in clean.iterdir()) == ["manifest.json", "train"]
    assert sorted(p.name for p in (clean / "train").iterdir()) == [
        "00000.tar",
        "00001.tar",
        "00002.tar",
        "shards.json",
    ]
    assert [s["n"] for s in read_shard_index(clean / "train")["shards"]] == [128, 128, 44]
    expected = fashion_scenes(300, seed=2)
    back = read_pairs(clean / "train")
    np.testing.assert_array_equal(back.ids, expected.ids)
    np.testing.assert_array_equal(back.images, expected.images)
    assert back.captions == expected.captions
    np.testing.assert_array_equal(back.caption_classes, expected.caption_classes)
    assert sorted(pair.id for pair in PairStream(clean / "train")) == expected.ids.tolist()
    _, data = load_manifests(clean)
    assert data["format"] == "shards" and data["n_rows"] == 300


def test_train_and_eval_find_the_shards_of_a_poisoned_directory(tmp_path):
    from otcclip.evaluate import _train_columns, load_eval_inputs
    from otcclip.train import TrainConfig, load_training_data

    out = tmp_path / "poisoned"
    result = _run(f"poison --out {out} --scenes 200 --attack badnet --n-poison 10 --format shards")
    assert result.exit_code == 0, result.output
    table, manifests = load_training_data(TrainConfig(data=str(out)))
    assert len(table) == 200 and manifests[0].attack == "badnet"
    assert set(manifests[0].poisoned_ids) <= set(table.ids.tolist())
    _, _, train = load_eval_inputs(out)
    assert train == out / "train"
    assert _train_columns(train)["id"].tolist() == table.ids.tolist()
    # and back to parquet, through --data
    again = tmp_path / "again"
    assert _run(f"poison --out {again} --data {out}").exit_code == 0
    np.testing.assert_array_equal(read_pairs(again / "train.parquet").images, table.images)


def test_options_and_what_is_not_supported(tmp_path, clean):
    result = CliRunner().invoke(main, ["poison", "--out", str(tmp_path / "x"), "--shard-size", "5"])
    assert result.exit_code != 0 and "only meaningful with --format shards" in result.output
    assert not (tmp_path / "x").exists()
    # match streams shards in and writes shards out: a file name for --out is refused
    args = ["match", "--pool", str(clean / "train"), "--images", str(clean / "train")]
    args += ["--checkpoint", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "m.pq")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "looks like a file name" in result.output
    assert not (tmp_path / "m.pq").exists()
    args[-1] = str(tmp_path / "matched")  # a folder: the pool (shards) is what is refused now
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "the pool is one parquet file" in result.output
    assert not (tmp_path / "matched").exists()
