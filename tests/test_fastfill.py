"""FastFill: the uncertainty-weighted loss, the uncertainty the backfill writes, `fct refill`'s exact
top-F selection, its exactly-once resume after a kill, and the backfill curve's end points."""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from fct_dist import currency, evaluation, features, lake, layout, losses, ranking, tables
from fct_dist.models import registry
from fct_dist.pipeline import backfill, refill
from fct_dist.storage import open_store

from .support import copy_tree
from .harness.kill import kill_session, wait_for_files


def test_the_loss_equals_a_hand_computed_case():
    pred, target = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    logits, labels = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]), torch.tensor([1, 0])
    s = torch.tensor([0.2, -1.0])
    # squared error per item, mean over dims: 2.5 and 0.5; smoothed CE (0.1, 2 classes): item 0 has
    # p = (1/4, 3/4) for label 1, item 1 has p = (1/2, 1/2)
    ce = [-(0.9 * math.log(0.75) + 0.1 * (math.log(0.25) + math.log(0.75)) / 2), math.log(2.0)]
    per_item = [2.5 + 0.1 * ce[0], 0.5 + 0.1 * ce[1]]
    want = np.mean([0.5 * math.exp(-0.2) * per_item[0] + 0.5 * 0.2, 0.5 * math.exp(1.0) * per_item[1] + 0.5 * -1.0])
    got = losses.transformation(pred, target, s, logits, labels, classification_weight=0.1, smoothing=0.1, mu=0.5)
    assert float(got) == pytest.approx(want, rel=1e-6)
    assert float(losses.transformation(pred, target)) == pytest.approx(1.5)  # plain FCT: the MSE


def test_the_backfill_writes_the_models_uncertainty(trained):
    cfg, store, _ = trained
    h, meta = registry.load(store, "fct")
    assert meta["arch"]["uncertainty"]
    out = lake.read_lake(store, store.path("embeddings", "fct", "test"), {"id": pa.int64()}).sort_by("id")
    stored = lake.read_lake(store, store.path("embeddings", "stored", "test"), {"id": pa.int64()}).sort_by("id")
    np.testing.assert_array_equal(out["id"].to_numpy(), stored["id"].to_numpy())
    with torch.no_grad():
        emb = h.eval()(torch.from_numpy(lake.to_numpy(stored["old"])), torch.from_numpy(lake.to_numpy(stored["side"])))
        s = h.log_variance(emb).numpy()
    assert out.schema.field("uncertainty").type == pa.float32()
    np.testing.assert_allclose(out["uncertainty"].to_numpy(), s, rtol=1e-5, atol=1e-6)
    assert np.ptp(s) > 0  # a per-row value, not one constant


def top_f(ids: np.ndarray, s: np.ndarray, k: int) -> np.ndarray:
    """The k ids to re-extract in plain numpy: uncertainty descending, then id ascending."""
    return np.sort(ids[np.lexsort((ids, -s))[:k]])


@pytest.mark.parametrize("budget", [0.0, 0.013, 0.25, 0.5, 1.0])
def test_the_selection_is_exactly_the_top_f_ids(any_cfg, budget):
    """The radix select's passes in this process's threads (Ray's tasks run it in the refill tests below)."""
    cfg = any_cfg("extract.distributor=local")
    store = open_store(cfg.storage)
    rng = np.random.default_rng(0)
    n, files = 997, 5
    ids = rng.permutation(np.arange(-500, 3 * n, 3))[:n]  # negative ids too, spread over the files unordered
    s = rng.choice(np.array([-2.5, -1.0, 0.5, 0.75, 3.0], np.float32), n)  # few values: ties everywhere
    s[:7] = rng.normal(size=7).astype(np.float32) * 10
    paths = []
    for i, part in enumerate(np.array_split(np.arange(n), files)):
        paths.append(store.path("u", lake.part_name(i)))
        lake.write_part(store, paths[-1], pa.table({"id": pa.array(ids[part], pa.int64()),
                                                    "uncertainty": pa.array(s[part], pa.float32())}))
    k = round(budget * n)
    t = refill.threshold(cfg, store, paths, k)
    got = np.sort(np.concatenate([ids[part][refill.selected(ids[part], s[part], t)]
                                  for part in np.array_split(np.arange(n), files)]))
    np.testing.assert_array_equal(got, top_f(ids, s, k))


def expected_refill(store, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, vectors, reextracted) of a refill of k rows, from the backfilled and re-extracted lakes."""
    h = lake.read_lake(store, store.path("embeddings", "fct", "test"), {"id": pa.int64()}).sort_by("id")
    new = lake.read_lake(store, store.path("embeddings", "new", "test"), {"id": pa.int64()}).sort_by("id")
    ids, s = h["id"].to_numpy(), h["uncertainty"].to_numpy()
    order = evaluation.backfill_orders(ids, lake.to_numpy(h["emb"]), lake.to_numpy(new["emb"]), s)["uncertainty"]
    picked = np.zeros(len(ids), bool)
    picked[order[:k]] = True
    return ids, evaluation.mixed_gallery(lake.to_numpy(h["emb"]), lake.to_numpy(new["emb"]), order, k), picked


def check_refill(store, out: str, k: int) -> None:
    got = lake.read_lake(store, out, {"id": pa.int64()}).sort_by("id")
    ids, want, picked = expected_refill(store, k)
    np.testing.assert_array_equal(got["id"].to_numpy(), ids)  # every id once
    np.testing.assert_array_equal(got["reextracted"].to_numpy(), picked)
    np.testing.assert_allclose(lake.to_numpy(got["emb"]), want, atol=1e-5)
    summary = currency.manifest(store, out)["summary"]
    assert summary["true_rows"] == {"reextracted": k} and summary["rows_out"] == len(ids)


@pytest.mark.parametrize("budget", [0.0, 0.3, 1.0])
def test_refill_re_extracts_exactly_the_chosen_rows(ray_local, trained, budget):
    cfg, store, _ = trained
    out = store.path("refilled", str(budget))
    m = refill.refill(cfg, store, budget, output=out)
    k = round(budget * m["rows"])
    check_refill(store, out, k)
    assert m["producer"]["emb"]["rows_reextracted"] == k


def split_lake(store, directory: str, files: int) -> None:
    """Rewrite a finished lake of ours as `files` files (its producer metadata and manifest kept)."""
    t = lake.read_lake(store, directory, {"id": pa.int64()}).sort_by("id")
    schema_meta = lake.read_schema(store, lake.parts(store, directory)[0]).metadata
    m = currency.manifest(store, directory)
    for path in lake.parts(store, directory):
        store.delete(path)
    bounds = np.linspace(0, t.num_rows, files + 1).astype(int)
    for i in range(files):
        lake.write_part(store, f"{directory}/{lake.part_name(i)}",
                        t.slice(bounds[i], bounds[i + 1] - bounds[i]).replace_schema_metadata(schema_meta))
    store.write_json(f"{directory}/_manifest.json", m | {"files": [lake.part_name(i) for i in range(files)]})


def test_a_killed_refill_resumes_exactly_once(ray_local, trained, local_cfg):
    cfg, files = local_cfg(), 12
    store = open_store(cfg.storage)
    for part in (("models",), ("images",), ("embeddings", "fct"), ("embeddings", "new")):
        copy_tree(trained[1], store, *part)
    split_lake(store, store.path("embeddings", "fct", "test"), files)
    args = [sys.executable, "-m", "fct_dist.cli", "refill", "--preset", "tiny", "--set", f"storage.root={store.root}",
            "--budget", "1.0", "--set", "extract.batch_size=1", "--set", "extract.num_actors=1"]
    out = store.path("embeddings", "refill", "test")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_files(store, out, 2, lambda: proc.poll() is None)
    kill_session(proc)
    done_at_kill = len(store.list(out, ".parquet"))
    assert 2 <= done_at_kill < files and not currency.has_manifest(store, out), "the kill did not land mid-run"
    refill.refill(local_cfg("extract.batch_size=1", "extract.num_actors=1"), store, 1.0)  # the rerun, in this process
    m = currency.manifest(store, out)
    assert m["summary"]["files_mapped_this_run"] == files - done_at_kill  # the files done before the kill were kept
    check_refill(store, out, m["rows"])


def test_the_curve_ends_at_the_backfilled_and_the_re_extracted_gallery(trained):
    cfg, store, _ = trained
    curve = evaluation.backfill_curve(cfg, store)
    truth = features.split_truth(store, "test")
    (ids, new, labels), (_, h, _) = (evaluation.load_source(store, m, "test", truth) for m in ("new", "fct"))
    q = np.sort(np.random.default_rng(1).choice(len(ids), curve["queries"], replace=False))
    for f, g in ((0, h), (-1, new)):
        r = ranking.exact_ranking(new[q], labels[q], ids[q], g, labels, ids, 1, cfg.eval.block_size)
        for order, c in curve["curves"].items():
            assert (c["top1"][f], c["map"][f]) == pytest.approx((r["cmc"][0], r["map"])), (order, f)
    # the upgrade's refill (budget 0.1) is the uncertainty curve's 10 % point, scored on the same queries
    i = int(np.argmin(np.abs(np.asarray(curve["fractions"]) - 0.1)))
    assert (curve["refill"]["top1"], curve["refill"]["map"]) == pytest.approx(
        (curve["curves"]["uncertainty"]["top1"][i], curve["curves"]["uncertainty"]["map"][i]))
    assert set(curve["curves"]) == {"uncertainty", "random", "oracle"}
    # an interior point of each order, against a gallery mixed here by that order; each AUC is its points' mean
    s = lake.read_lake(store, layout.embeddings(store, "fct", "test"), {"id": pa.int64()},
                       columns=["id", cfg.columns.uncertainty]).sort_by("id")[cfg.columns.uncertainty].to_numpy()
    orders = {"uncertainty": np.lexsort((ids, -s)), "random": np.random.default_rng(0).permutation(len(ids)),
              "oracle": np.lexsort((ids, -np.linalg.norm(h - new, axis=1)))}  # most uncertain / wrong first, ties by id
    i = 3
    count = round(curve["fractions"][i] * len(ids))
    assert 0 < count < len(ids)
    for order, first in orders.items():
        g = h.copy()
        g[first[:count]] = new[first[:count]]
        r = ranking.exact_ranking(new[q], labels[q], ids[q], g, labels, ids, 1, cfg.eval.block_size)
        c = curve["curves"][order]
        assert (c["top1"][i], c["map"][i]) == pytest.approx((r["cmc"][0], r["map"])), order
        assert (c["auc_top1"], c["auc_map"]) == pytest.approx((np.mean(c["top1"]), np.mean(c["map"]))), order


def test_labels_map_ids_to_the_classifiers_classes_and_name_what_is_missing(local_cfg):
    """The id -> class join behind the classifier's CE: a wrong index, an id read as another's label, or a
    missing id or unknown class passed over silently would each fail a line here."""
    from fct_dist.features import Labels
    store = open_store(local_cfg().storage)
    directory = store.path("labels")
    lake.write_part(store, f"{directory}/{lake.part_name(0)}",
                    pa.table({"id": pa.array([5, 1, 3, 9], pa.int64()), "label": pa.array([2, 7, 2, 4], pa.int32())}))
    labels = Labels(directory, "id", "label", [2, 4, 7])
    assert labels.targets(store, np.array([1, 3, 9, 5])).tolist() == [2, 0, 1, 0]
    with pytest.raises(lake.LakeError, match=r"no 'label' for id 4 \(1 feature rows without a label"):
        labels.targets(store, np.array([1, 4, 5]))
    narrow = Labels(directory, "id", "label", [2, 4])
    with pytest.raises(lake.LakeError, match=r"id 1 has label 7, a class the new model's classifier does not have"):
        narrow.targets(store, np.array([3, 1]))
    assert dataclasses.replace(narrow, ignore_unknown=True).targets(store, np.array([3, 1, 9])).tolist() == [0, -100, 1]


def test_refill_reads_and_writes_iceberg_tables(ray_local, trained, local_cfg):
    """The backfilled gallery as an Iceberg table, refilled into another: the rows the Parquet refill gives."""
    cfg = local_cfg("backfill.distributor=local", "extract.distributor=local")  # Ray's pool: the test above
    store = open_store(cfg.storage)
    for part in (("models",), ("images",), ("embeddings", "stored"), ("embeddings", "fct"), ("embeddings", "new")):
        copy_tree(trained[1], store, *part)
    backfill.backfill(cfg, store, output="iceberg://ns.gallery")
    m = refill.refill(cfg, store, 0.3, input="iceberg://ns.gallery", output="iceberg://ns.refilled")
    k = round(0.3 * m["rows"])
    got = tables.catalog(cfg, store).load_table("ns.refilled").scan().to_arrow().sort_by("id")
    ids, want, picked = expected_refill(store, k)
    np.testing.assert_array_equal(got["id"].to_numpy(), ids)
    np.testing.assert_array_equal(got["reextracted"].to_numpy(), picked)
    np.testing.assert_allclose(np.stack(got["emb"].to_numpy(zero_copy_only=False)), want, atol=1e-5)
