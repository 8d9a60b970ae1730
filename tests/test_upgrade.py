"""`fct upgrade` with the tiny preset: every stage end to end, and a report equal to `fct evaluate`."""
from __future__ import annotations

import numpy as np
import pytest

from fct_dist import cli, currency, evaluation, layout, search
from fct_dist.models import registry


def test_upgrade_runs_every_stage_and_writes_the_report(trained):
    cfg, store, report_dir = trained
    for artefact in ("report.md", "metrics.json", "cmc.png", "search.png", "backfill.png"):
        assert store.exists(f"{report_dir}/{artefact}")
    metrics = store.read_json(f"{report_dir}/metrics.json")
    steps = metrics["runs"][0]["steps"]
    assert set(steps) <= set(metrics["runs"][0]["timings"])
    features = [i for i, s in enumerate(steps) if s.startswith("extract the transformation's features")]
    assert len(features) == 2 and max(features) < steps.index("train the transformation h, with and without side-info (side by side)")
    assert steps.index("index the upgraded lake") < steps.index("evaluate: the compatibility matrix and index recall")
    for model in ("old", "side", "new", "bct", "fct", "fct-noside"):
        assert registry.exists(store, model)
    for name, split in (("stored", "test"), ("features", "train"), ("features", "test"), ("fct", "test"),
                        ("fct-noside", "test"), ("new", "test"), ("bct", "test"), ("refill", "test")):
        assert currency.has_manifest(store, layout.embeddings(store, name, split)), name
    assert metrics["runs"][0]["evaluation"]["index_recall_at_10"]["fct"] > 0.9
    labels = [c["label"] for c in metrics["cases"]]
    assert labels == ["old / old", "new / new", "new / FCT (with side-info)", "new / FCT (no side-info)",
                      "BCT-new / old", "BCT-new / BCT-new", "new / old", "side-info / side-info", "v3 / v3",
                      "v3 / FCT chained (v1 -> v2 -> v3)", "v3 / FCT direct (v1 -> v3)", "v3 / FCT (with side-info)",
                      "v3 / old"]
    report = store.read_bytes(f"{report_dir}/report.md").decode()
    assert "| new / FCT (with side-info) |" in report and "## Goals" in report and "![search](search.png)" in report
    assert "## Partial re-extraction (FastFill)" in report and "| uncertainty |" in report
    assert "> **Smoke run** on synthetic data" in report  # the tiny preset's numbers are not read as a result
    assert f"- the backfilled gallery (no image re-read): {store.uri(layout.embeddings(store, 'fct', 'test'))}" in report


def test_search_names_ids_not_in_the_split_and_draws_the_answers(trained, tmp_path, capsys):
    cfg, store, _ = trained
    args = ["search", "--preset", "tiny", "--set", f"storage.root={cfg.storage.root}"]
    assert cli.main(args + ["--ids", "5", "17"]) == 2
    assert "ids [5, 17] are not in" in capsys.readouterr().err
    ids = search.spread_ids(store, "test", 2).tolist()
    png = tmp_path / "search.png"
    assert cli.main(args + ["--ids", *map(str, ids), "--k", "3", "--plot", str(png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (label")[0] for line in lines] == [f"query {i}" for i in ids]
    assert all(len(line.split(": ", 1)[1].split()) == 3 for line in lines)  # k neighbours each
    _, dist, _ = search.query(store, "new", "fct", "test", ids, 3, cfg.index.nprobe)
    for line, want in zip(lines, dist):  # each hit prints its distance to 3 significant digits, however small
        printed = [float(hit.split("(")[1].rstrip(")")) for hit in line.split(": ", 1)[1].split()]
        np.testing.assert_allclose(printed, want, rtol=5e-3)
    from PIL import Image
    width, height = Image.open(png).size
    assert width > 1.5 * height  # 2 rows of 1 query + 3 neighbours


def test_report_numbers_equal_fct_evaluate(trained):
    cfg, store, report_dir = trained
    reported = {c["label"]: c for c in store.read_json(f"{report_dir}/metrics.json")["cases"]}
    fresh = evaluation.matrix(cfg, store)
    for c in fresh["cases"]:
        for m in ("top1", "top5", "map"):
            assert reported[c["label"]][m] == pytest.approx(c[m], abs=1e-12)
        assert reported[c["label"]]["cmc"] == pytest.approx(c["cmc"], abs=1e-12)


def test_cli_reports_a_bad_config_before_any_work(tmp_path, capsys):
    assert cli.main(["upgrade", "--set", f"storage.root={tmp_path}/r", "--set", "train.num_workers=-3"]) == 2
    assert "train.num_workers: -3 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_seeds_are_aggregated_as_mean_and_std():
    from fct_dist import config, report, runner
    cfg = runner.with_seed(config.load(None), 7)
    assert {s.seed for s in (cfg.train.old, cfg.train.side, cfg.train.new, cfg.train.bct, cfg.train.transformation)} == {7}

    def run(top1, m_ap):
        case = {"query": "new", "gallery": "fct", "label": "new / FCT", "method": "exact",
                "top1": top1, "top5": 1.0, "map": m_ap, "cmc": [top1, 1.0]}
        return {"evaluation": {"cases": [case]}}
    (agg,) = report.aggregate([run(0.8, 0.5), run(0.9, 0.7)])
    assert agg["top1"] == pytest.approx(0.85) and agg["top1_std"] == pytest.approx(0.05)
    assert agg["map"] == pytest.approx(0.6) and agg["map_std"] == pytest.approx(0.1)
    assert agg["cmc"] == pytest.approx([0.85, 1.0])


def test_the_versions_section_shows_the_mean_and_each_seeds_share_and_judges_the_better_strategy():
    """Two seeds whose mean favours direct: a section that averaged shares instead of cases, swapped the
    seeds' columns, picked chained or judged the goal on the other strategy would fail a line here."""
    from fct_dist import report

    def run(chained, direct):
        cases = [{"query": q, "gallery": g, "label": f"{q} / {g}", "method": "exact", "top1": t, "top5": 1.0, "map": t,
                  "cmc": [t]} for q, g, t in (("old", "old", 0.5), ("v3", "v3", 1.0), ("v3", "fct-v2-v3", chained),
                                              ("v3", "fct-v1-v3", direct))]
        return {"evaluation": {"cases": cases}}
    runs = [run(0.9, 0.95), run(0.8, 0.97)]  # per seed: chained 80 / 60 %, direct 90 / 94 % of the gap
    goal, lines = report.versions_goal(report.aggregate(runs), runs, 3)
    assert "| chained | 70.0 | 70.0 | 80.0 / 60.0 | 80.0 / 60.0 |" in lines  # (0.85 - 0.5) / 0.5
    assert "| direct | 92.0 | 92.0 | 90.0 / 94.0 | 90.0 / 94.0 |" in lines
    assert goal["measured"] == "chained: top-1 70.0 %, mAP 70.0 %; direct: top-1 92.0 %, mAP 92.0 %"
    assert not goal["met"]  # chained under 90 %, direct under 95 %
    single_goal, single = report.versions_goal(report.aggregate(runs[:1]), runs[:1], 3)
    assert "| direct | 90.0 | 90.0 |" in single and single_goal["met"] is False
    # chained's bar is 90 %, direct's 95 %: 92 / 94 % misses (direct), 92 / 96 % meets
    for direct, met in ((0.97, False), (0.98, True)):
        one = [run(0.96, direct)]
        assert report.versions_goal(report.aggregate(one), one, 3)[0]["met"] is met


def test_the_goals_hold_ours_against_their_bars_and_show_fcts_published_shares():
    """95 % of the top-1 gap and 100 % of mAP's, side-info >= 2 points: a figure just under a bar misses it
    (the earlier bars, 97 % of mAP and 1.5 points, would pass those), and each line shows the paper's figure."""
    from fct_dist import report

    def goals(fct_map, noside_top1):
        cases = [{"query": q, "gallery": g, "top1": t, "top5": t, "map": m} for q, g, t, m in (
            ("old", "old", 0.5, 0.5), ("new", "new", 1.0, 1.0), ("new", "fct", 0.98, fct_map),
            ("new", "fct-noside", noside_top1, 0.9), ("bct", "old", 0.6, 0.6))]
        return report.goals(cases)
    g = goals(1.0, 0.955)  # 96 % of the top-1 gap, 100 % of mAP's, side-info +2.5
    assert g[0]["met"] and g[1]["met"]
    assert g[0]["measured"] == "top-1 96.0 %, mAP 100.0 % (FCT's paper: ImageNet-1k 85 % / 91 %; CIFAR-100 72 % / 79 %)"
    assert g[1]["measured"] == "+2.50 top-1 points (FCT's paper: ImageNet-1k +3.3; CIFAR-100 +3.0)"
    g = goals(0.99, 0.962)  # mAP 98 %, side-info +1.8
    assert not g[0]["met"] and not g[1]["met"]
