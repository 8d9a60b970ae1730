"""`fct bench` in tiny mode: its bookkeeping, not its speed."""
from __future__ import annotations

import numpy as np
import pytest

from fct_dist import currency, lake, tables
from fct_dist.bench import fixtures, profiles as bench
from fct_dist.config import Projection
from fct_dist.bench.projection import project
from fct_dist.progress import rate
from fct_dist.storage import open_store

from .support import expected_backfill, read_output


@pytest.mark.slow
def test_bench_counts_ids_and_ratios(ray_local, local_cfg):
    cfg = local_cfg()
    store = open_store(cfg.storage)
    r = bench.run(cfg, store)
    profiles = {p.name: p for p in fixtures.profiles(cfg)}
    assert set(r["profiles"]) == {"demo", "production"}
    split = f"n{cfg.bench.rows}"
    for name, res in r["profiles"].items():
        sub = bench.profile_store(store, profiles[name])
        n_items = {"backfill": cfg.bench.rows, bench.IO_JOB: cfg.bench.rows, "re-extraction": profiles[name].items}
        lakes = {"backfill": "fct", bench.IO_JOB: "zero-cost", "re-extraction": "new"}
        for job in [j for j in lakes if j in res]:
            j = res[job]
            folder = split if job != "re-extraction" else fixtures.IMAGE_SPLIT
            (ids_a, emb_a), (ids_b, emb_b) = (read_output(sub, sub.path("embeddings", f"{lakes[job]}-{d}", folder))
                                              for d in bench.DISTRIBUTORS)
            # both distributors wrote every item once, the same ids, and the same vectors (the same engine)
            assert j["local"]["rows"] == j["ray"]["rows"] == n_items[job] == len(ids_a)
            assert np.array_equal(ids_a, np.arange(n_items[job])) and np.array_equal(ids_a, ids_b)
            np.testing.assert_allclose(emb_a, emb_b, atol=1e-4)
            assert j["same_output"] is True
            # the derived figures come from the measured ones
            inputs = sub.path("embeddings", "stored", split) if job != "re-extraction" else sub.path("images", folder)
            nbytes = sum(sub.fs.get_file_info(p).size for p in lake.parts(sub, inputs))
            for run in (j["local"], j["ray"]):
                assert run["wall_items_per_second"] == pytest.approx(run["rows"] / run["seconds"], rel=0.01)
                assert run["items_per_second"] >= run["wall_items_per_second"]  # steady: start-up left out
                assert run["cpu_seconds_per_million"] == pytest.approx(run["cpu_seconds"] / run["rows"] * 1e6, rel=0.01, abs=0.1)
                assert run["cpu_seconds"] > 0 and run["gpu_seconds_per_million"] == 0
                assert run["bytes_per_item"] == pytest.approx(nbytes / run["rows"], abs=0.1)
            assert j["ray_over_local"] == pytest.approx(j["ray"]["items_per_second"] / j["local"]["items_per_second"], abs=1e-3)
        assert res["reextracted_ids_are_backfilled_ids"] is True
        sp = res["speedup"]
        assert sp["ray"] == pytest.approx(res["backfill"]["ray"]["items_per_second"]
                                          / res["re-extraction"]["ray"]["items_per_second"], abs=0.1)
    prod = r["profiles"]["production"]
    # the zero-cost transform writes each row's stored `old` vector: the I/O path alone
    sub = bench.profile_store(store, profiles["production"])
    _, out = read_output(sub, sub.path("embeddings", "zero-cost-ray", split))
    _, old = read_output(sub, sub.path("embeddings", "stored", split), "old")
    np.testing.assert_array_equal(out, old)
    assert prod[bench.IO_JOB]["plain_loop"]["rows"] == cfg.bench.rows
    assert prod["compute_only"]["rows"] > 0 and prod["compute_only"]["threads"] >= 1
    goals = {g["id"]: g["measured"] for g in r["goals"]}
    biggest = [s for s in r["scale"] if s["rows"] == max(cfg.bench.scale_rows)][0]
    assert goals["h"] == pytest.approx(
        biggest["items_per_second"] / prod["compute_only"]["items_per_second"], abs=1e-3)
    assert goals["io"] == pytest.approx(
        prod[bench.IO_JOB]["ray"]["items_per_second"] / prod[bench.IO_JOB]["plain_loop"]["items_per_second"], abs=1e-3)
    assert [s["rows"] for s in r["scale"]] == cfg.bench.scale_rows
    pj, pc = r["projection"], cfg.bench.projection
    row = next(x for x in pj["rows"] if x["job"] == "re-extraction" and x["gpus"] == pc.gpus[0])
    compute_h = pc.items / (pc.gpus[0] * pc.gpu_extract_images_per_s) / 3600
    storage_h = pc.items * row["bytes_per_item"] * 8 / (pc.storage_gbps * 1e9) / 3600
    assert row["wall_hours"] == pytest.approx(max(compute_h, storage_h), abs=1e-3)
    assert row["gpu_hours"] == pytest.approx(pc.gpus[0] * row["wall_hours"], rel=0.01)
    # the Iceberg path: the same rows and vectors as the folder's, committed as one snapshot of the output table
    ib, sub = r["iceberg"], bench.profile_store(store, profiles["production"])
    assert ib["table"]["rows"] == ib["folder"]["rows"] == cfg.bench.rows
    t = tables.catalog(cfg, sub).load_table(f"bench.fct_{split}")
    got = t.scan().to_arrow().sort_by("id")
    ids, want = read_output(sub, sub.path("embeddings", "fct-folder", split))
    np.testing.assert_array_equal(got["id"].to_numpy(), ids)
    np.testing.assert_allclose(np.stack(got["emb"].to_numpy(zero_copy_only=False)), want, atol=1e-6)
    assert len(t.snapshots()) == 1
    assert goals["iceberg"] == pytest.approx(1 / (1 + ib["table_cost_end_to_end"]), abs=1e-3)
    assert ib["table_cost_end_to_end"] == pytest.approx(
        ib["table"]["end_to_end_seconds"] / ib["folder"]["end_to_end_seconds"] - 1, abs=1e-3)
    for artefact in ("bench.md", "bench.json", "throughput.png", "scaling.png"):
        assert store.exists(f"{r['report_dir']}/{artefact}")
    assert "| production | re-extraction |" in store.read_bytes(f"{r['report_dir']}/bench.md").decode()



def test_projection_takes_the_slower_of_the_gpus_and_the_object_store():
    pc = Projection(items=1_000_000, gpus=[1, 100], storage_gbps=0.008, gpu_backfill_rows_per_s=2000.0,
                    gpu_extract_images_per_s=10.0)
    run = {"items_per_second": 500.0, "gpus": 1.0, "bytes_per_item": 1000.0, "cpu_seconds_per_million": 3600.0}
    by = {(r["job"], r["gpus"]): r for r in project(pc, {"backfill": {"ray": run}, "re-extraction": {"ray": run}},
                                                     gpu=False)["rows"]}
    # reading 1e6 items x 1000 B at 8 Mbit/s takes 1000 s, whatever the GPUs
    assert (by[("backfill", 1)]["bound"], by[("backfill", 1)]["wall_hours"]) == ("storage", round(1000 / 3600, 3))
    assert (by[("re-extraction", 1)]["bound"], by[("re-extraction", 1)]["wall_hours"]) == ("GPU", round(1e5 / 3600, 3))
    assert by[("re-extraction", 100)]["gpu_hours"] == round(100 * 1000 / 3600, 2)  # 100 GPUs for 1000 s
    assert {r["rate_source"] for r in by.values()} == {"assumed"}
    assert by[("backfill", 1)]["cpu_core_hours_at_measured_rate"] == 1.0
    measured = project(pc, {"backfill": {"ray": run}, "re-extraction": {"ray": run}}, gpu=True)["rows"]
    assert {(r["per_gpu_rate"], r["rate_source"]) for r in measured} == {(500.0, "measured")}


@pytest.mark.slow
def test_scale_profile_backfills_indexes_and_measures_recall_against_exact_search(ray_local, local_cfg):
    """`fct bench --profile scale` in tiny mode. At nprobe = nlist an IVF-Flat search is exhaustive,
    so its recall must be exactly 1: a wrong id mapping in the index, the streamed ground truth or
    the recall count fails it; fewer lists probed find less."""
    from fct_dist.bench import scale as bench_scale
    cfg = local_cfg("bench.scale.rows=[1500,3000]", "bench.scale.rows_per_file=500", "bench.scale.queries=40",
                    "bench.scale.nprobe=[1,16]", "bench.scale.clusters=20", "index.factory=IVF16,Flat",
                    "index.num_shards=3")
    store = open_store(cfg.storage)
    r = bench_scale.run(cfg, store)
    assert [b["rows"] for b in r["backfill"]] == [1500, 3000] and [b["files"] for b in r["backfill"]] == [3, 6]
    root = store.sub("bench", "scale")
    ids, emb = read_output(root, root.path("embeddings", bench_scale.OUT, "c3000"))
    want_ids, want = expected_backfill(root, "fct", root.path("embeddings", "stored", "c3000"))  # h in plain torch
    assert np.array_equal(ids, np.arange(3000)) and np.array_equal(want_ids, ids)
    np.testing.assert_allclose(emb, want, rtol=1e-4, atol=1e-5)
    assert not currency.has_manifest(root, root.path("embeddings", bench_scale.OUT, "c1500"))  # only the largest is kept
    curve = {p["nprobe"]: p for p in r["search"]["curve"]}
    assert curve[16]["recall"] == 1.0 and curve[16]["nearest_in_top_k"] == 1.0
    assert curve[1]["recall"] < 1.0
    assert r["index"]["rows"] == 3000 and r["index"]["shards"] == 3
    assert store.exists(f"{r['report_dir']}/recall.png") and "recall@10" in store.read_bytes(
        f"{r['report_dir']}/bench.md").decode()


def test_a_clustered_lake_is_the_first_files_of_a_larger_one():
    """Each file's rows depend on its index only, so the scale profile's 1M lake is the start of its 25M
    lake (same distribution at every size), and the queries' stream is none of the files'."""
    s = fixtures.Clustered(clusters=5, latent=3, spread=0.1, noise=0.01)
    dims = {"old": 4, "side": 6}
    a, b = s.rows(dims, 10, 1), s.rows(dims, 10, 1)
    assert all(np.array_equal(a[c], b[c]) and a[c].shape == (10, dims[c]) and a[c].dtype == np.float32 for c in dims)
    assert not np.array_equal(a["old"], s.rows(dims, 10, 2)["old"])
    # clustered: a row's nearest neighbour is far closer than rows are on average (unclustered normal
    # rows of the same dims: ~0.2)
    x = s.rows(dims, 500, 0)["old"]
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    mean = d.sum() / (len(x) * (len(x) - 1))
    np.fill_diagonal(d, np.inf)
    assert d.min(axis=1).mean() / mean < 0.05


def test_usage_catches_a_memory_spike_between_samples():
    """Peak RSS comes from the kernel's high-water mark: a spike shorter than the sampling interval is
    counted (sampled RSS would miss it), and the next measurement starts afresh."""
    import time

    from fct_dist.bench.measure import Usage
    with Usage(interval=30) as quiet:
        time.sleep(0.2)
    with Usage(interval=30) as spike:
        x = np.ones(400 * 2**20 // 8)  # 400 MB, touched, then freed before any sample
        del x
        time.sleep(0.2)
    with Usage(interval=30) as after:
        time.sleep(0.2)
    assert spike.driver_peak - quiet.driver_peak > 300 * 2**20
    assert after.driver_peak < spike.driver_peak - 300 * 2**20


def test_a_slow_rate_keeps_its_significant_digits():
    # the bench's tiny runs on a busy machine re-extract well under one item per second: a rate
    # rounded to fixed decimals (0.16 for 14 items in 90 s) is 3 % off the figure it reports
    assert rate(14, 90) == 0.1556 and rate(2_000_000, 3) == 666_700.0
