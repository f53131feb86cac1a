import json

import pytest

from otcclip.demo import DemoConfig, results_table, run_demo


@pytest.mark.slow
def test_demo_end_to_end_writes_table_plots_and_commands(tmp_path):
    config = DemoConfig(
        out=str(tmp_path / "demo"),
        scenes=600,
        epochs=2,
        batch_size=64,
        threads=1,
        n_targets=2,
        n_captions=5,
        n_backdoor=12,
        eval_size=100,
        probe_size=100,
        progress=False,
        train_overrides={"warmup_epochs": 1, "k": 4, "iters": 5},
    )
    lines: list[str] = []
    runs = run_demo(config, echo=lines.append)
    out = tmp_path / "demo"
    assert [r.defense for r in runs] == ["none", "otcclip"]
    assert (out / "poisoned" / "train.parquet").is_file()
    assert (out / "epochs.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "rounds.png").is_file()
    results = json.loads((out / "results.json").read_text())
    assert [r["defense"] for r in results["runs"]] == ["none", "otcclip"]
    # otcclip ran one matching round (epoch 2) and reported what it re-paired
    assert results["runs"][1]["last_round"]["round"] == 1
    assert "otcclip train --data" in (out / "results.md").read_text()
    for run in runs:
        assert 0.0 <= run.final["zero_shot_top1"] <= 1.0
        assert run.final["linear_probe"] is not None
        assert run.final["targeted_asr"] is not None and run.final["backdoor_asr"] is not None
    table = results_table(runs)
    assert table.splitlines()[2].startswith("none") and table.splitlines()[3].startswith("otcclip")
    assert table in "\n".join(lines)


def test_table_prints_unmeasured_and_undefined_shares_as_a_dash():
    from otcclip.demo import RunSummary

    run = RunSummary(
        defense="otcclip",
        metrics=[
            {
                "epoch": 1,
                "defense": {"round": 1, "changed_precision": float("nan"), "clean_kept": 1.0},
            }
        ],
        final={"zero_shot_top1": 0.5, "targeted_asr": None},
        seconds_per_epoch=1.0,
        command="",
    )
    row = results_table([run]).splitlines()[2]
    assert "nan" not in row and "100.0%" in row and " 50.0%" in row
