"""`fct upgrade` with the tiny preset: every stage end to end, and a report equal to `fct evaluate`."""
from __future__ import annotations

import pytest

from fct_dist import cli, evaluate


def test_upgrade_runs_every_stage_and_writes_the_report(trained):
    cfg, store, report_dir = trained
    for artefact in ("report.md", "metrics.json", "cmc.png"):
        assert store.exists(f"{report_dir}/{artefact}")
    metrics = store.read_json(f"{report_dir}/metrics.json")
    stages = metrics["runs"][0]["timings"]
    for stage in ("data", "train-old", "train-side-info", "extract stored lake (old, side)", "train-new",
                  "train-new --bct", "train-transformation", "train-transformation --no-side", "backfill (fct)",
                  "backfill (fct-noside)", "re-extract (new)", "re-extract (bct)", "index (fct)", "evaluate"):
        assert stage in stages
    labels = [c["label"] for c in metrics["cases"]]
    assert labels == ["old / old", "new / new", "new / FCT (with side-info)", "new / FCT (no side-info)",
                      "BCT-new / old", "BCT-new / BCT-new", "new / old", "side-info / side-info"]
    report = store.read_bytes(f"{report_dir}/report.md").decode()
    assert "| new / FCT (with side-info) |" in report and "## Goals" in report


def test_report_numbers_equal_fct_evaluate(trained):
    cfg, store, report_dir = trained
    reported = {c["label"]: c for c in store.read_json(f"{report_dir}/metrics.json")["cases"]}
    fresh = evaluate.matrix(cfg, store)
    for c in fresh["cases"]:
        for m in ("top1", "top5", "map"):
            assert reported[c["label"]][m] == pytest.approx(c[m], abs=1e-12)
        assert reported[c["label"]]["cmc"] == pytest.approx(c["cmc"], abs=1e-12)


def test_cli_reports_a_bad_config_before_any_work(tmp_path, capsys):
    assert cli.main(["upgrade", "--set", f"storage.root={tmp_path}/r", "--set", "train.num_workers=-3"]) == 2
    assert "train.num_workers: -3 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
