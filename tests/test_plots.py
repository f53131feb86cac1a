import pytest

from otcclip.plots import plot_epochs, plot_rounds, round_reports


def _metrics(asr: list[float], rounds: bool) -> list[dict]:
    out = []
    for i, a in enumerate(asr):
        scores = {"targeted_asr": a, "backdoor_asr": a / 2, "zero_shot_top1": 0.5}
        m = {"epoch": i + 1, "eval": scores}
        if rounds and i >= 1:
            m["defense"] = {"round": i, "poison_broken": 0.9, "clean_kept": 0.8}
        out.append(m)
    return out


def test_round_reports_picks_only_epochs_with_a_round():
    reports = round_reports(_metrics([0.1, 0.2, 0.3], rounds=True))
    assert [epoch for epoch, _ in reports] == [2, 3]
    assert reports[0][1]["poison_broken"] == pytest.approx(0.9)


def test_plots_write_png_files(tmp_path):
    runs = {"none": _metrics([0.5, 0.9], False), "otcclip": _metrics([0.5, 0.1], True)}
    plot_epochs(runs, tmp_path / "epochs.png")
    assert plot_rounds(runs, tmp_path / "rounds.png")
    for name in ("epochs.png", "rounds.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_plot_rounds_without_rounds_writes_nothing(tmp_path):
    assert not plot_rounds({"none": _metrics([0.5], False)}, tmp_path / "rounds.png")
    assert not (tmp_path / "rounds.png").exists()
