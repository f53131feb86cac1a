"""`otcclip match` as a user runs it: files in, one parquet out, clear refusals.

A tiny model from scratch (its pairing is arbitrary; the tests check the
contract of the output, not the quality of an untrained model) and a few
fashion-scenes written as a pairs parquet.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from otcclip.cli import main
from otcclip.data import PairStream, fashion_scenes, read_pairs, write_pairs, write_shards
from otcclip.models import create_model, save_weights

N = 20


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("match")
    bundle = create_model("otc-vit-tiny", seed=0)
    weights = root / "weights.safetensors"
    save_weights(bundle, weights)
    table = fashion_scenes(N, seed=3, image_size=bundle.image_size)
    pairs = root / "pairs.parquet"
    write_pairs(table, pairs)
    # a pool with other ids, and an images file pointing at it by caption_id
    pool = root / "pool.parquet"
    pool_ids = np.arange(N, dtype=np.int64) + 1000
    pq.write_table(pa.table({"caption_id": pool_ids, "text": table.captions}), pool)
    pngs = root / "png"
    pngs.mkdir()
    for i, img in zip(table.ids, table.images, strict=True):
        Image.fromarray(img).save(pngs / f"{i}.png")
    order = np.random.default_rng(0).permutation(N)
    images = root / "images.parquet"
    pq.write_table(
        pa.table(
            {
                "image_id": table.ids[order],
                "image_path": [f"png/{i}.png" for i in table.ids[order]],
                "caption_id": pool_ids[order],
            }
        ),
        images,
    )
    return {"root": root, "weights": weights, "pairs": pairs, "pool": pool, "images": images}


def run(*args: str) -> object:
    return CliRunner().invoke(main, ["match", *map(str, args)], catch_exceptions=False)


def base(
    files: dict[str, Path], out: Path, pool: Path | None = None, images: Path | None = None
) -> list[str]:
    return [
        "--pool",
        pool or files["pairs"],
        "--images",
        images or files["pairs"],
        "--checkpoint",
        files["weights"],
        "--out",
        out,
        "--k",
        "4",
        "--iters",
        "10",
        "--no-progress",
    ]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_help_names_the_defaults():
    result = CliRunner().invoke(main, ["match", "--help"])
    assert result.exit_code == 0
    for text in (
        "--pool",
        "--flag-only",
        "--assign",
        "default: 16",
        "default: 0.5",
        "default: argmax",
        "default: 0.05",
    ):
        assert text in result.output


def test_pairs_file_is_rematched_and_trainable(files, tmp_path):
    out = tmp_path / "matched.parquet"
    result = run(*base(files, out))
    assert result.exit_code == 0, result.output
    assert "matched 20 images against 20 captions" in result.output
    assert f"wrote {out}" in result.output
    assert "true content (from the class columns): 100.0% before" in result.output
    t = pq.read_table(out).to_pydict()
    source = read_pairs(files["pairs"])
    assert t["id"] == source.ids.tolist()
    assert t["original_caption_id"] == source.ids.tolist()  # a pairs file: caption id = id
    by_id = dict(zip(source.ids.tolist(), source.captions, strict=True))
    for cid, text, orig, changed in zip(
        t["caption_id"], t["caption"], t["original_caption_id"], t["changed"], strict=True
    ):
        assert text == by_id[cid]
        assert changed == (cid != orig)
    scores = np.array(t["score"])
    np.testing.assert_allclose(
        scores, 0.5 * np.array(t["global_score"]) + 0.5 * np.array(t["ot_score"]), atol=1e-5
    )
    assert (scores >= np.array(t["own_score"]) - 1e-6).all()
    # the output is itself a pairs file: the images came through untouched
    again = read_pairs(out)
    np.testing.assert_array_equal(again.images, source.images)
    assert again.captions == t["caption"]
    assert pq.read_schema(out).metadata[b"otcclip.matching"]


def test_images_by_path_against_a_separate_pool(files, tmp_path):
    out = tmp_path / "matched.parquet"
    report = tmp_path / "report.json"
    args = base(files, out, pool=files["pool"], images=files["images"])
    result = run(*args, "--alpha", "1", "--margin", "0", "--json", report)
    assert result.exit_code == 0, result.output
    t = pq.read_table(out).to_pydict()
    assert sorted(t["id"]) == list(range(N))
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in t["image_path"])
    # image i's own caption is pool id 1000 + i: with alpha 1 and no margin the
    # assigned caption is the best by global cosine, never below the own one
    assert t["original_caption_id"] == [1000 + i for i in t["id"]]
    assert all(1000 <= c < 1000 + N for c in t["caption_id"])
    assert all(np.isnan(x) for x in t["ot_score"])
    assert (np.array(t["score"]) >= np.array(t["own_score"]) - 1e-6).all()
    assert '"changed"' in report.read_text()


def test_flag_only_keeps_the_pairs_and_flags(files, tmp_path):
    out = tmp_path / "flags.parquet"
    result = run(*base(files, out), "--flag-only", "--margin", "0")
    assert result.exit_code == 0, result.output
    assert "suspicious:" in result.output and "nothing re-paired" in result.output
    t = pq.read_table(out).to_pydict()
    assert "changed" not in t
    assert t["caption_id"] == t["id"]
    best, own = np.array(t["best_score"]), np.array(t["score"])
    np.testing.assert_array_equal(np.array(t["suspicious"]), own < best)


def test_capacity_bounds_the_caption_loads(files, tmp_path):
    free, out = tmp_path / "free.parquet", tmp_path / "cap.parquet"
    assert run(*base(files, free), "--margin", "0").exit_code == 0
    shared = pq.read_table(free).column("caption_id").to_pylist()
    assert len(set(shared)) < N  # without a capacity some caption goes to several images
    result = run(*base(files, out), "--assign", "capacity", "--capacity", "1", "--margin", "0")
    assert result.exit_code == 0, result.output
    ids = pq.read_table(out).column("caption_id").to_pylist()
    changed = pq.read_table(out).column("changed").to_pylist()
    moved = [c for c, ch in zip(ids, changed, strict=True) if ch]
    assert moved  # something moved, so the bound below is tested, not vacuous
    assert len(moved) == len(set(moved))


def test_max_changed_bounds_the_re_paired_share(files, tmp_path):
    free, capped = tmp_path / "free.parquet", tmp_path / "capped.parquet"
    assert run(*base(files, free), "--margin", "0").exit_code == 0
    result = run(*base(files, capped), "--margin", "0", "--max-changed", "0.25")
    assert result.exit_code == 0, result.output
    t_free, t_cap = pq.read_table(free).to_pydict(), pq.read_table(capped).to_pydict()
    assert sum(t_free["changed"]) > N // 4  # the cap binds on this data
    assert sum(t_cap["changed"]) == N // 4
    # the kept re-pairings are those the score doubted most, with the same captions
    lead = np.array(t_free["score"]) - np.array(t_free["own_score"])
    kept = np.flatnonzero(t_cap["changed"])
    dropped = np.flatnonzero(np.array(t_free["changed"]) & ~np.array(t_cap["changed"]))
    assert lead[kept].min() >= lead[dropped].max()
    assert all(t_cap["caption_id"][i] == t_free["caption_id"][i] for i in kept)
    unchanged = [i for i in range(N) if not t_cap["changed"][i]]
    assert all(t_cap["caption_id"][i] == t_cap["original_caption_id"][i] for i in unchanged)
    bad = run(*base(files, capped), "--max-changed", "1.5")
    assert bad.exit_code != 0 and "--max-changed" in bad.output


def test_a_pool_bank_takes_the_candidates_from_its_draw(files, tmp_path):
    out, report = tmp_path / "bank.parquet", tmp_path / "bank.json"
    args = [*base(files, out), "--k", "4", "--margin", "0", "--seed", "5"]
    result = run(*args, "--pool-bank", "8", "--json", report)
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["pruned_against"] == 8
    ids = read_pairs(files["pairs"]).ids
    bank = set(ids[np.sort(np.random.default_rng(5).choice(N, size=8, replace=False))].tolist())
    t = pq.read_table(out).to_pydict()
    for got, mine in zip(t["caption_id"], t["original_caption_id"], strict=True):
        assert got in bank or got == mine
    bad = run(*base(files, tmp_path / "small.parquet"), "--k", "4", "--pool-bank", "3")
    assert bad.exit_code == 2 and "cannot hold k = 4" in bad.output
    bad = run(*base(files, tmp_path / "f.parquet"), "--pool-bank", "18", "--flag-outside-topk")
    assert bad.exit_code == 2 and "needs the exact top-k" in bad.output


def test_precomputed_embeddings_are_checked(files, tmp_path):
    table = pq.read_table(files["pool"])
    wrong = table.append_column(
        "embedding", pa.array([[1.0, 0.0, 0.5]] * N, pa.list_(pa.float32()))
    )
    pool = tmp_path / "pool_emb.parquet"
    pq.write_table(wrong, pool)
    out = tmp_path / "out.parquet"
    result = run(*base(files, out, pool=pool, images=files["images"]))
    assert result.exit_code != 0
    assert "'embedding' column is 3 wide" in result.output
    assert not out.exists() and leftovers(tmp_path) == []


def _bad_images_file(folder: Path) -> Path:
    good = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(good, format="PNG")
    path = folder / "bad_images.parquet"
    pq.write_table(
        pa.table(
            {
                "id": [0, 1, 2],
                "image": [good.getvalue(), b"not a png", None],
                "caption_id": [0, 1, 2],
            }
        ),
        path,
    )
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_text_column", "needs a text column"),
        ("empty_pool", "the caption pool is empty"),
        ("unreadable_images", "2 of 3 images cannot be read (ids [1, 2])"),
        ("k_too_large", "larger than the pool"),
        ("own_not_in_pool", "caption_id values are not in the pool"),
        ("missing_image_column", "needs an id"),
        ("capacity_without_value", "--assign capacity needs --capacity"),
        ("no_checkpoint", "does not exist"),
    ],
)
def test_bad_input_stops_without_output(files, tmp_path, case, message):
    out = tmp_path / "out.parquet"
    args = base(files, out)
    if case == "no_text_column":
        pool = tmp_path / "p.parquet"
        pq.write_table(pa.table({"id": [0, 1]}), pool)
        args = base(files, out, pool=pool)
    elif case == "empty_pool":
        pool = tmp_path / "p.parquet"
        pq.write_table(
            pa.table({"id": pa.array([], pa.int64()), "caption": pa.array([], pa.string())}), pool
        )
        args = base(files, out, pool=pool)
    elif case == "unreadable_images":
        args = base(files, out, images=_bad_images_file(tmp_path))
    elif case == "k_too_large":
        args = [*base(files, out), "--k", "50"]
    elif case == "own_not_in_pool":
        args = base(files, out, pool=files["pairs"], images=files["images"])  # ids 0.. vs 1000..
    elif case == "missing_image_column":
        images = tmp_path / "i.parquet"
        pq.write_table(pa.table({"id": [0], "caption_id": [0]}), images)
        args = base(files, out, images=images)
    elif case == "capacity_without_value":
        args = [*base(files, out), "--assign", "capacity"]
    elif case == "no_checkpoint":
        args = base(files, out)
        args[args.index("--checkpoint") + 1] = tmp_path / "missing.safetensors"
    result = run(*args)
    assert result.exit_code != 0
    assert message in result.output
    assert not out.exists() and leftovers(tmp_path) == []


def _invalid_utf8_pool(folder: Path) -> Path:
    """A pool whose caption column holds bytes that are not UTF-8 (pyarrow writes them)."""
    raw = pa.array([b"a shirt", b"a \xff\xfe bag"], pa.binary())
    text = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())
    path = folder / "bad_utf8.parquet"
    pq.write_table(pa.table({"id": pa.array([0, 1], pa.int64()), "caption": text}), path)
    return path


def test_invalid_utf8_captions_are_one_line_errors(files, tmp_path):
    out = tmp_path / "out.parquet"
    result = run(*base(files, out, pool=_invalid_utf8_pool(tmp_path)))
    assert result.exit_code == 2
    assert "bad_utf8.parquet is not a readable parquet file" in result.output
    assert "UTF8" in result.output or "UTF-8" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("seed", range(6))
def test_byte_flipped_parquet_is_an_error_not_a_traceback(files, tmp_path, seed):
    data = bytearray(files["pool"].read_bytes())
    rng = np.random.default_rng(seed)
    for pos in rng.integers(4, len(data) - 4, size=8):
        data[pos] ^= 0xFF
    pool = tmp_path / "flipped.parquet"
    pool.write_bytes(bytes(data))
    out = tmp_path / "out.parquet"
    result = run(*base(files, out, pool=pool, images=files["images"]))  # no exception escapes
    if result.exit_code != 0:
        assert result.output.strip().splitlines()[-1].startswith("Error:"), result.output
        assert not out.exists()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("out_is_a_folder", "is a directory; give a file name"),
        ("out_under_a_file", "is a file, so"),
        ("json_is_a_folder", "is a directory; give a file name"),
        ("out_is_the_images", "is the --images input: writing there would replace it"),
        ("out_is_the_json", "is also --out"),
    ],
)
def test_output_paths_are_checked_before_any_work(files, tmp_path, case, message, monkeypatch):
    import otcclip.commands.match as match_command

    monkeypatch.setattr(match_command, "_inputs", lambda *a: pytest.fail("work started"))
    out = tmp_path / "matched.parquet"
    extra: list[object] = []
    if case == "out_is_a_folder":
        out.mkdir()
    elif case == "out_under_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "x.parquet"
    elif case == "json_is_a_folder":
        (tmp_path / "report").mkdir()
        extra = ["--json", tmp_path / "report"]
    elif case == "out_is_the_json":
        extra = ["--json", out]
    args = base(files, out)
    if case == "out_is_the_images":
        images = tmp_path / "images.parquet"
        images.write_bytes(files["pairs"].read_bytes())
        args = base(files, images, images=images)
        before = images.read_bytes()
    result = run(*args, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output
    if case == "out_is_the_images":
        assert images.read_bytes() == before
    else:
        assert not out.is_file() and not (tmp_path / "report").is_file()


def test_extra_input_columns_are_carried_through(files, tmp_path):
    source = pq.read_table(files["pairs"])
    urls = [f"https://example.org/{i}.png" for i in source.column("id").to_pylist()]
    table = source.append_column("url", pa.array(urls)).append_column(
        "score", pa.array(np.arange(N, dtype=np.float64))
    )
    images = tmp_path / "with_url.parquet"
    pq.write_table(table, images)
    out = tmp_path / "out.parquet"
    result = run(*base(files, out, images=images))
    assert result.exit_code == 0, result.output
    t = pq.read_table(out).to_pydict()
    assert t["url"] == [f"https://example.org/{i}.png" for i in t["id"]]
    assert t["input_score"] == [float(i) for i in range(N)]  # a clash keeps both, renamed
    assert "image_classes" in t and "caption_classes" not in t  # the latter would be stale


# --------------------------------------------------------------------------- shards


@pytest.fixture(scope="module")
def shards(files: dict[str, Path]) -> Path:
    """The pairs parquet's table as a poison folder written with --format shards (8, 8, 4)."""
    table = read_pairs(files["pairs"])
    folder = files["root"] / "poison-shards"
    write_shards(table, folder / "train", shard_size=8)
    return folder


def shard_members(tar: Path) -> list[str]:
    with tarfile.open(tar) as handle:
        return handle.getnames()


def shard_json(tar: Path) -> dict[int, dict]:
    with tarfile.open(tar) as handle:
        found = [m for m in handle.getmembers() if m.name.endswith(".json")]
        records = [json.loads(handle.extractfile(m).read()) for m in found]  # type: ignore[union-attr]
    return {r["id"]: r for r in records}


def test_shards_are_matched_as_the_same_pairs_in_parquet(files, shards, tmp_path):
    flat, out = tmp_path / "flat.parquet", tmp_path / "matched"
    report = tmp_path / "report.json"
    options = ["--margin", "0", "--batch-size", "8"]  # 3 image batches, like the shards
    assert run(*base(files, flat), *options).exit_code == 0
    result = run(*base(files, out, images=shards), *options, "--json", report)
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (20 pairs in 3 shards)" in result.output
    assert "true content (from the class columns): 100.0% before" in result.output
    expected = pq.read_table(flat).to_pydict()
    assert sum(expected["changed"]) > 0  # the comparison covers re-paired images
    # one output shard per input shard, the same member keys in the same order
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        keys = [m.rsplit(".", 1)[0] for m in shard_members(shards / "train" / name)]
        assert [m.rsplit(".", 1)[0] for m in shard_members(out / name)] == keys
    records = {}
    for tar in sorted(out.glob("*.tar")):
        records.update(shard_json(tar))
    for row, pair_id in enumerate(expected["id"]):
        got = records[pair_id]
        for field in ("caption_id", "original_caption_id", "changed", "suspicious"):
            assert got[field] == expected[field][row], (pair_id, field)
        for field in ("global_score", "ot_score", "score", "own_score"):
            assert got[field] == pytest.approx(expected[field][row], abs=1e-6), (pair_id, field)
    assert json.loads(report.read_text())["changed"] == sum(expected["changed"])
    # the output reads back with the project's readers: same pixels, the assigned captions
    again, source = read_pairs(out), read_pairs(files["pairs"])
    assert again.ids.tolist() == expected["id"]
    assert again.captions == expected["caption"]
    np.testing.assert_array_equal(again.images, source.images)
    np.testing.assert_array_equal(again.image_classes, source.image_classes)
    by_id = dict(zip(source.ids.tolist(), source.caption_classes, strict=True))
    for cid, classes in zip(expected["caption_id"], again.caption_classes, strict=True):
        np.testing.assert_array_equal(classes, by_id[cid])  # the classes of the new caption
    assert PairStream(out, shuffle=False).n_pairs == N  # shards.json for train --stream
    assert leftovers(out) == []


def test_a_single_shard_with_flag_only(files, shards, tmp_path):
    out = tmp_path / "flags"
    single = shards / "train" / "00002.tar"
    result = run(*base(files, out, images=single), "--flag-only", "--margin", "0")
    assert result.exit_code == 0, result.output
    assert "matched 4 images" in result.output and "nothing re-paired" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["00002.tar", "shards.json"]
    assert PairStream(out, shuffle=False).n_pairs == 4  # the input folder's index, recounted
    pairs = read_pairs(out)
    source = read_pairs(single)
    assert pairs.ids.tolist() == source.ids.tolist() and pairs.captions == source.captions
    for pair_id, record in shard_json(out / "00002.tar").items():
        assert record["caption_id"] == pair_id  # own caption kept
        assert record["suspicious"] == (record["score"] < record["best_score"])


def test_shard_images_come_batch_by_batch_in_shard_order(files, shards):
    from otcclip.match_shards import image_batches, scan_shards

    scanned = scan_shards(shards / "train", 56)
    assert [len(ids) for ids in scanned.shard_ids] == [8, 8, 4]
    sizes = [batch.shape for batch in image_batches(scanned, 3)]
    assert sizes == [(3, 56, 56)] * 6 + [(2, 56, 56)]
    assert scanned.ids.tolist() == read_pairs(files["pairs"]).ids.tolist()


def _rewrite_member(source: Path, target: Path, member: str, data: bytes) -> None:
    """A copy of a shard with one member's bytes replaced (a corrupt image, say)."""
    with tarfile.open(source) as old, tarfile.open(target, "w") as new:
        for info in old.getmembers():
            body = old.extractfile(info).read()  # type: ignore[union-attr]
            body = data if info.name == member else body
            info.size = len(body)
            new.addfile(info, io.BytesIO(body))


def test_a_corrupt_member_is_named_and_nothing_is_written(files, shards, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for tar in sorted((shards / "train").glob("*.tar")):
        shutil.copy(tar, broken / tar.name)
    _rewrite_member(shards / "train" / "00002.tar", broken / "00002.tar", "000000018.png", b"x")
    out = tmp_path / "matched"
    result = run(*base(files, out, images=broken))
    assert result.exit_code != 0
    last = result.output.strip().splitlines()[-1]
    assert "00002.tar: id 18: cannot decode the image" in last and "nothing was written" in last
    assert not out.exists()


def test_a_failure_while_writing_leaves_whole_shards_only(files, shards, tmp_path, monkeypatch):
    import otcclip.match_shards as match_shards

    real = match_shards._add_member
    calls = []

    def failing(*args: object) -> None:
        calls.append(1)
        if len(calls) == 11:  # the third pair of the second shard
            raise OSError("disk full")
        real(*args)

    monkeypatch.setattr(match_shards, "_add_member", failing)
    out = tmp_path / "matched"
    with pytest.raises(OSError, match="disk full"):
        run(*base(files, out, images=shards))
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar"]  # no temp file, no index
    assert len(read_pairs(out / "00000.tar")) == 8


def _shard_case(case: str, files: dict[str, Path], shards: Path, tmp_path: Path) -> list[object]:
    out = tmp_path / "out"
    images: Path = shards
    pool = files["pairs"]
    if case == "empty_folder":
        images = tmp_path / "empty"
        images.mkdir()
    elif case == "mixed_formats":
        images = tmp_path / "mixed"
        images.mkdir()
        shutil.copy(shards / "train" / "00000.tar", images)
        shutil.copy(files["pairs"], images)
    elif case == "no_members":
        images = tmp_path / "none.tar"
        tarfile.open(images, "w").close()
    elif case == "damaged_tar":
        images = tmp_path / "damaged.tar"
        images.write_bytes(b"\x00not a tar" * 100)
    elif case == "repeated_ids":
        images = tmp_path / "twice"
        images.mkdir()
        shutil.copy(shards / "train" / "00000.tar", images / "00000.tar")
        shutil.copy(shards / "train" / "00000.tar", images / "00001.tar")
    elif case == "ids_not_in_pool":
        pool = files["pool"]  # caption ids 1000.., the shards' ids 0..
    elif case == "out_is_parquet":
        out = tmp_path / "out.parquet"
    elif case == "out_holds_shards":
        out.mkdir()
        (out / "00000.tar").write_bytes(b"")
    return [*base(files, out, pool=pool, images=images)]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty_folder", "holds no webdataset shards: expected .tar files"),
        ("mixed_formats", "mixes formats: .tar shards and pairs.parquet"),
        ("no_members", "the shards hold no members"),
        ("damaged_tar", "damaged.tar: cannot read the webdataset shard"),
        ("repeated_ids", "ids repeat across or within the shards (e.g. [0, 1, 2"),
        ("ids_not_in_pool", "20 image ids (pairs files and shards pair each image"),
        ("out_is_parquet", "so --out is a folder that gets one shard per input shard"),
        ("out_holds_shards", "already holds .tar shards"),
    ],
)
def test_bad_shard_input_stops_without_output(files, shards, tmp_path, case, message):
    args = _shard_case(case, files, shards, tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = run(*args)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_img2dataset_shards_keep_their_members_and_metadata(files, tmp_path):
    """img2dataset's own layout: .jpg, .txt and a .json of its fields, no shards.json."""
    source = read_pairs(files["pairs"])
    folder = tmp_path / "img2dataset"
    folder.mkdir()
    jpgs = {}
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i in range(4):
            key = f"{i:09d}"
            jpg = io.BytesIO()
            Image.fromarray(source.images[i]).convert("RGB").save(jpg, format="JPEG")
            jpgs[key] = jpg.getvalue()
            meta = {"url": f"https://example.org/{i}.jpg", "key": key, "status": "success"}
            meta["score"] = 0.5  # a clash with the round's field: kept, renamed
            for suffix, data in (
                ("jpg", jpgs[key]),
                ("txt", b"a crawled caption"),
                ("json", json.dumps(meta).encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "matched"
    result = run(*base(files, out, images=folder))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar"]  # no index: none came in
    with tarfile.open(out / "00000.tar") as tar:
        names = tar.getnames()
        assert names[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]
        for key, data in jpgs.items():  # the image bytes as stored, not re-encoded
            assert tar.extractfile(f"{key}.jpg").read() == data  # type: ignore[union-attr]
    records = shard_json(out / "00000.tar")
    assert records[2]["url"] == "https://example.org/2.jpg" and records[2]["status"] == "success"
    assert records[2]["input_score"] == 0.5 and records[2]["score"] != 0.5
    assert records[2]["original_caption_id"] == 2
    assert read_pairs(out).captions == [source.captions[r["caption_id"]] for r in records.values()]
