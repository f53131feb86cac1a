"""benchmarks/bench_scale.py: at tiny sizes it writes the shards, trains and matches in a
process per size, and prints one line of real measurements per size and the RSS verdict."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIZES = (128, 256)
SIZE_LINE = re.compile(
    r"N=(\d+): train (\d+) steps x 32: (\d+) pairs/s, waiting on data ([\d.]+)% of step time "
    r"\(the first step's [\d.]+s starts the workers; after it [\d.]+%\), "
    r"peak RSS trainer (\d+) \+ largest worker (\d+) MiB \| round ([\d.]+)s \((.*); the rest "
    r"reading shards\), re-paired (\d+), peak RSS (\d+) MiB \| pixel pass ([\d.]+)s "
    r"\(reading ([\d.]+)s\), evidence ([\d.]+) MiB, peak RSS (\d+) MiB"
)
OTCCLIP_LINE = re.compile(
    r"N=(\d+): streamed OTCCLIP \| pixel pass and screen ([\d.]+)s \((\d+) screened\) \| "
    r"epoch (\d+) steps x 32: (\d+) pairs/s, waiting on data ([\d.]+)% of step time \(the "
    r"first step's [\d.]+s starts the workers; after it [\d.]+%\) \| round ([\d.]+)s "
    r"\((\d+) judged, (\d+) left out\) \| peak RSS trainer (\d+) MiB \+ largest child (\d+) "
    r"MiB \(the pixel pass's process (\d+) MiB, or a DataLoader worker\)"
)
RATIO_LINE = re.compile(r"peak RSS ratio largest/smallest: ([\d.]+) \(<= 1.3: (met|NOT met)\)")
GROWTH_LINE = re.compile(
    r"trainer peak RSS (\d+) -> (\d+) MiB from (\d+) to (\d+) pairs: (-?[\d,]+) bytes a pair"
)


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "bench_scale", ROOT / "benchmarks" / "bench_scale.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_sizes_print_a_measured_line_each_and_the_ratio_of_their_peaks(tmp_path, capsys):
    bench = _load_script()
    args = ["--sizes", *map(str, SIZES), "--max-steps", "2", "--batch-size", "32", "--defense"]
    args += ["none"]
    args += ["--shard-size", "32", "--workers", "1", "--cache", str(tmp_path), "--threads", "1"]
    assert bench.main(args) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "the first 2 steps per size" in printed[0] and "release mode" in printed[1]
    found = [SIZE_LINE.fullmatch(line) for line in printed[2:4]]
    assert all(found), printed
    peaks = []
    for n, match in zip(SIZES, found, strict=True):
        assert int(match[1]) == n and int(match[2]) == 2
        assert int(match[3]) > 0 and 0 < float(match[4]) < 100
        assert int(match[5]) > 0 and int(match[6]) > 0 and int(match[10]) > 0
        assert float(match[7]) > 0 and "embed_images" in match[8] and "score" in match[8]
        assert 0 < float(match[12]) < float(match[11]) and int(match[14]) > 0
        assert float(match[13]) == pytest.approx(n * 624 / 2**20, rel=0.1, abs=0.01)  # ~600 B/pair
        peaks.append((int(match[5]), int(match[6])))
    # the shards were written once by the poison command and are reused
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"scenes-{n}-seed0-shard32" for n in sorted(SIZES)
    ]
    assert GROWTH_LINE.fullmatch(printed[4]), printed
    ratio = RATIO_LINE.fullmatch(printed[5])
    assert ratio, printed
    expected = max(peaks[1][0] / peaks[0][0], peaks[1][1] / peaks[0][1])
    assert float(ratio[1]) == pytest.approx(expected, abs=0.02)  # printed MiB are rounded
    assert ratio[2] == ("met" if float(ratio[1]) <= 1.3 else "NOT met")


def test_the_growth_line_gives_the_trainer_s_gain_per_pair():
    bench = _load_script()
    peaks = [(400_000, 2000.0, 900.0), (20_000, 1000.0, 800.0)]
    line = bench._growth_line(peaks)
    assert (
        line == "trainer peak RSS 1000 -> 2000 MiB from 20000 to 400000 pairs: 2,759 bytes a pair"
    )


def test_the_verdict_compares_the_larger_of_the_trainer_and_worker_growth():
    bench = _load_script()
    grown_worker = [(1000, 100.0, 50.0), (8000, 110.0, 80.0)]
    assert (
        bench._ratio_line(grown_worker) == "peak RSS ratio largest/smallest: 1.60 (<= 1.3: NOT met)"
    )
    flat = [(1000, 100.0, 0.0), (8000, 120.0, 0.0)]  # no workers: the trainer alone
    assert bench._ratio_line(flat) == "peak RSS ratio largest/smallest: 1.20 (<= 1.3: met)"


def test_a_size_without_the_round_or_the_pixel_pass_says_so():
    bench = _load_script()
    trained = {
        "steps": 3,
        "pairs_per_s": 250.0,
        "data_wait_share": 0.02,
        "first_wait_s": 0.5,
        "later_wait_share": 0.01,
        "rss_trainer_mib": 1000.0,
        "rss_worker_mib": 500.0,
    }
    args = bench._parser().parse_args(["--batch-size", "32", "--skip-round", "--skip-pixels"])
    line = bench._size_line(2000, trained, None, None, args)
    assert line == (
        "N=2000: train 3 steps x 32: 250 pairs/s, waiting on data 2.0% of step time (the first "
        "step's 0.5s starts the workers; after it 1.0%), peak RSS trainer 1000 + largest worker "
        "500 MiB | round not measured (--skip-round) | pixel pass not measured (--skip-pixels)"
    )


@pytest.mark.slow
def test_the_default_measures_the_trainers_streamed_otcclip_epoch_and_round(tmp_path, capsys):
    """One epoch of streamed OTCCLIP and its first round, in the trainer, per size."""
    bench = _load_script()
    args = ["--sizes", *map(str, SIZES), "--batch-size", "32", "--shard-size", "32"]
    args += ["--workers", "1", "--cache", str(tmp_path), "--threads", "1"]
    assert bench.main(args) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "streamed OTCCLIP" in printed[0] and "then its first round" in printed[0]
    for n, line in zip(SIZES, printed[2:4], strict=True):
        match = OTCCLIP_LINE.fullmatch(line)
        assert match, line
        assert int(match[1]) == n and int(match[4]) == n // 32  # the whole epoch
        assert float(match[2]) > 0 and float(match[7]) > 0 and int(match[5]) > 0
        assert int(match[8]) == n  # every pair judged from its kept embeddings
        assert 0 < int(match[9]) <= 0.25 * n and int(match[10]) > 0 and int(match[11]) > 0
        # the pass ran in a process of its own, which counts among the children
        assert 0 < int(match[12]) <= int(match[11])
    growth = GROWTH_LINE.fullmatch(printed[4])
    assert growth and (int(growth[3]), int(growth[4])) == SIZES, printed
    assert RATIO_LINE.fullmatch(printed[5]), printed
    with pytest.raises(SystemExit, match="use --defense none"):
        bench.main([*args, "--max-steps", "3"])
