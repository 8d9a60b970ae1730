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


def test_seeds_are_aggregated_as_mean_and_std():
    from fct_dist import config, report, upgrade
    cfg = upgrade.with_seed(config.load(None), 7)
    assert {s.seed for s in (cfg.train.old, cfg.train.side, cfg.train.new, cfg.train.bct, cfg.train.transformation)} == {7}

    def run(top1, m_ap):
        case = {"query": "new", "gallery": "fct", "label": "new / FCT", "method": "exact",
                "top1": top1, "top5": 1.0, "map": m_ap, "cmc": [top1, 1.0]}
        return {"evaluation": {"cases": [case]}}
    (agg,) = report.aggregate([run(0.8, 0.5), run(0.9, 0.7)])
    assert agg["top1"] == pytest.approx(0.85) and agg["top1_std"] == pytest.approx(0.05)
    assert agg["map"] == pytest.approx(0.6) and agg["map_std"] == pytest.approx(0.1)
    assert agg["cmc"] == pytest.approx([0.85, 1.0])
