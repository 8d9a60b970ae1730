"""CMC / mAP against brute force; sharded FAISS index against one index; shards on S3."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from fct_dist import currency, evaluation, lake, ranking
from fct_dist.pipeline import index
from fct_dist.storage import StorageError, open_store


def brute_force(q, ql, qi, g, gl, gi, max_rank):
    """Per query: rank the gallery by (distance, gallery position), drop the query itself."""
    cmc, aps = np.zeros(max_rank), []
    for x, lab, own in zip(q, ql, qi):
        dists = [(float(((x - y) ** 2).sum()), j) for j, y in enumerate(g)]
        ranked = [j for _, j in sorted(dists) if gi[j] != own]
        rel = [gl[j] == lab for j in ranked]
        if not any(rel):
            continue
        first = rel.index(True)
        cmc[first:] += 1
        hits, precisions = 0, []
        for r, is_rel in enumerate(rel, 1):
            if is_rel:
                hits += 1
                precisions.append(hits / r)
        aps.append(np.mean(precisions))
    return cmc / len(aps), float(np.mean(aps)), len(aps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cmc_and_map_match_brute_force_with_ties_and_singletons(seed):
    rng = np.random.default_rng(seed)
    n, d = 60, 3
    g = rng.integers(0, 3, (n, d)).astype(np.float32)  # small integers: many exact distance ties
    labels = rng.integers(0, 6, n).astype(np.int32)
    labels[:3] = [97, 98, 99]  # classes of size one: such queries have no match and are left out
    ids = np.arange(100, 100 + n)
    cmc, m_ap, counted = brute_force(g, labels, ids, g, labels, ids, 10)
    got = ranking.exact_ranking(g, labels, ids, g, labels, ids, 10, block_size=7)
    np.testing.assert_allclose(got["cmc"], cmc, atol=1e-12)
    assert got["map"] == pytest.approx(m_ap, abs=1e-12)
    assert got["queries"] == counted and got["queries_without_match"] == 3


def test_positive_places_are_the_stable_argsorts():
    """The exact ranking places each positive by a float sort and counts its ties by column: the places must be
    the stable argsort's, negative distances (float cancellation), ties, zero and inf included."""
    rng = np.random.default_rng(0)
    pos = np.sort(rng.choice(200, 40, replace=False))
    many = rng.choice(np.array([-2.5, -1e-7, 0.0, 1e-7, 0.5, 3.0, 1e30, np.inf], np.float32), (5, 200))
    few = rng.normal(size=(5, 200)).astype(np.float32)
    few[:, np.setdiff1d(np.arange(200), pos)[:6]] = few[:, pos[:6]]  # six positives tie with a negative, per row
    for d in (many, few):  # all 40 positives tied (more than MANY_TIES: a stable argsort), six (a slice per tie)
        order = np.argsort(d, axis=1, kind="stable")
        want = np.sort(np.argsort(order, axis=1)[:, pos], axis=1)  # each positive's position in its row's order
        np.testing.assert_array_equal(ranking.positive_places(d, pos), want)


def test_exact_ranking_of_a_larger_gallery_matches_brute_force():
    """Integer points (distances exact in float32, ties between classes in every row), several blocks per class."""
    rng = np.random.default_rng(4)
    n = 400
    g = rng.integers(0, 4, (n, 2)).astype(np.float32)
    labels, ids = rng.integers(0, 5, n), np.arange(n) * 3
    cmc, m_ap, counted = brute_force(g, labels, ids, g, labels, ids, 5)
    got = ranking.exact_ranking(g, labels, ids, g, labels, ids, 5, block_size=16)
    np.testing.assert_allclose(got["cmc"], cmc, atol=1e-12)
    assert got["map"] == pytest.approx(m_ap, abs=1e-12) and got["queries"] == counted == n
    empty = ranking.exact_ranking(g, labels, ids, g[:0], labels[:0], ids[:0], 5, block_size=16)
    assert (empty["queries"], empty["queries_without_match"], empty["map"]) == (0, n, 0.0)


def test_cross_model_case_and_neighbour_path():
    rng = np.random.default_rng(3)
    q, g = rng.normal(size=(40, 4)).astype(np.float32), rng.normal(size=(50, 4)).astype(np.float32)
    ql, gl = rng.integers(0, 4, 40), rng.integers(0, 4, 50)
    qi, gi = np.arange(40), np.arange(50)  # queries 0..39 are also gallery items 0..39
    cmc, m_ap, _ = brute_force(q, ql, qi, g, gl, gi, 5)
    exact = ranking.exact_ranking(q, ql, qi, g, gl, gi, 5, 16)
    np.testing.assert_allclose(exact["cmc"], cmc, atol=1e-12)
    assert exact["map"] == pytest.approx(m_ap)
    flat = faiss.IndexFlatL2(4)
    flat.add(g)
    _, nbr = flat.search(q, 50)  # the whole gallery: mAP@50 is the full mAP
    via = ranking.ranking_from_neighbours(gi[nbr], ql, qi, gl, gi, 5)
    np.testing.assert_allclose(via["cmc"], cmc, atol=1e-12)
    assert via["map"] == pytest.approx(m_ap)


def vector_lake(store, n=3000, d=16, files=6, seed=0, key="vec-1"):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, d)) * 4
    x = (centers[rng.integers(0, 20, n)] + rng.normal(size=(n, d))).astype(np.float32)
    ids = rng.permutation(10 * n)[:n].astype(np.int64)
    directory = store.path("embeddings", "vec", "test")
    prod = {"emb": {"model": "test", "version": "v", "dim": d}}
    for k, sl in enumerate(np.array_split(np.arange(n), files)):
        lake.write_part(store, f"{directory}/{lake.part_name(k)}", lake.embedding_table(ids[sl], {"emb": x[sl]}, prod))
    currency.commit(store, directory, key, {"rows": n, "producer": prod})
    return ids, x


@pytest.mark.parametrize("factory", ["Flat", "IVF32,Flat"])
def test_sharded_search_equals_one_index(ray_local, any_cfg, factory):
    cfg = any_cfg(f"index.factory={factory}", "index.num_shards=3", "index.nprobe=4")
    store = open_store(cfg.storage)
    ids, x = vector_lake(store)
    m = index.build(cfg, store, "vec", "test")
    assert len(m["shards"]) == 3 and sum(s["rows"] for s in m["shards"]) == len(ids)
    assert m["factory"] == factory and m["dim"] == 16
    assert evaluation.index_recall(cfg, store, "vec", "test") > 0.9
    shards, _ = index.load(store, "vec", "test")
    single = faiss.deserialize_index(faiss.serialize_index(shards[0]))  # same trained quantizer
    single.reset()
    single.add_with_ids(x, ids)
    index.set_nprobe(single, 4)
    q = x[:50] + 0.1
    d1, i1 = single.search(q, 10)
    d2, i2 = index.search(store, "vec", "test", q, 10, 4)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-6)


def test_missing_or_corrupt_shard_is_named(ray_local, any_cfg):
    cfg = any_cfg("index.factory=Flat", "index.num_shards=2")
    store = open_store(cfg.storage)
    vector_lake(store)
    index.build(cfg, store, "vec", "test")
    shard = store.path("index", "vec", "test", "shard-00001.faiss")
    store.write_bytes(shard, b"garbage")
    with pytest.raises(StorageError, match=r"index shard .*shard-00001.faiss is corrupt"):
        index.load(store, "vec", "test")
    store.delete(shard)
    with pytest.raises(StorageError, match=r"index shard .*shard-00001.faiss is missing"):
        index.load(store, "vec", "test")


def test_auto_factory_by_size():
    assert index.choose_factory(20_000, 128, 100_000) == "Flat"
    assert index.choose_factory(1_000_000, 128, 200_000) == "IVF4096,Flat"
    assert index.choose_factory(1_000_000, 128, 100_000) == "IVF2048,Flat"  # >= 39 training rows per list
    assert index.choose_factory(1_000_000_000, 128, 10_000_000) == "IVF131072_HNSW32,PQ64"


def test_an_index_is_current_only_for_the_lake_it_indexes(ray_local, any_cfg, caplog):
    cfg = any_cfg("index.factory=Flat", "index.num_shards=2")
    store = open_store(cfg.storage)
    vector_lake(store)
    first = index.build(cfg, store, "vec", "test")
    assert index.current(cfg, store, "vec", "test") == first
    with caplog.at_level("INFO", logger="fct_dist"):
        assert index.build(cfg, store, "vec", "test") == first
    assert "is current: skipped" in caplog.text
    ids, x = vector_lake(store, seed=1, key="vec-2")  # the lake rewritten: other ids and vectors
    assert index.current(cfg, store, "vec", "test") is None
    index.build(cfg, store, "vec", "test")
    _, got = index.search(store, "vec", "test", x[:5], 1, cfg.index.nprobe)
    np.testing.assert_array_equal(got[:, 0], ids[:5])


def test_evaluation_asks_for_a_current_index_and_never_builds_one(ray_local, any_cfg):
    cfg = any_cfg("eval.exact_max_gallery=100")
    store = open_store(cfg.storage)
    ids, x = vector_lake(store)
    source = (np.sort(ids), x[np.argsort(ids)], np.zeros(len(ids), np.int64))
    with pytest.raises(lake.LakeError, match=r"gallery 'vec' has 3000 items .* no current index: build it"):
        evaluation.case(cfg, store, "vec", "vec", {"vec": source})
    assert not store.exists(store.path("index"))
    index.build(cfg, store, "vec", "test")
    assert evaluation.case(cfg, store, "vec", "vec", {"vec": source})["method"].startswith("faiss")


def test_evaluation_through_the_index_treats_dims_like_the_exact_path(ray_local, local_cfg):
    """A 16-d query model against an 8-d gallery: the exact path zero-pads the gallery; through a Flat
    index (whole gallery returned, so mAP@k is the full mAP) the ranking must be the same."""
    cfg = local_cfg("index.factory=Flat", "eval.exact_max_gallery=100", "eval.search_k=3000")
    store = open_store(cfg.storage)
    ids, x = vector_lake(store, d=8)  # the gallery: 3000 8-d vectors in 20 clusters
    order = np.argsort(ids)
    labels = np.random.default_rng(1).integers(0, 5, len(ids))
    wide = np.hstack([x, np.random.default_rng(2).normal(size=(len(ids), 8)).astype(np.float32)])  # 16-d queries
    sources = {"q16": (ids[order][:200], wide[order][:200], labels[order][:200]),
               "vec": (ids[order], x[order], labels[order])}
    index.build(cfg, store, "vec", "test")
    via_index = evaluation.case(cfg, store, "q16", "vec", sources)
    q_ids, q, q_labels = sources["q16"]
    exact = ranking.exact_ranking(q, q_labels, q_ids, x[order], labels[order], ids[order], cfg.eval.max_rank, 64)
    assert via_index["method"].startswith("faiss") and via_index["dims"] == [16, 8]
    # float32 distances of torch and faiss may order a near-tie differently: one query of 200 at most
    np.testing.assert_allclose(via_index["cmc"], exact["cmc"], atol=1 / 200 + 1e-12)
    assert via_index["map"] == pytest.approx(exact["map"], abs=0.005)


def test_index_recall_streams_the_exact_neighbours_over_the_lake(ray_local, local_cfg):
    """The ground truth built file by file must be the in-memory exact search's: a position mapped to
    the wrong id, or a file left out, changes the recall of this low-nprobe index."""
    cfg = local_cfg("index.factory=IVF32,Flat", "index.num_shards=2", "index.nprobe=1")
    store = open_store(cfg.storage)
    ids, x = vector_lake(store)
    index.build(cfg, store, "vec", "test")
    files = lake.parts(store, store.path("embeddings", "vec", "test"))
    q = index.sample_vectors(store, files, "emb", 16, 1000, seed=1)  # the queries index_recall draws
    exact = faiss.IndexIDMap(faiss.IndexFlatL2(16))
    exact.add_with_ids(x, ids)
    _, truth = exact.search(q, 10)
    shards, _ = index.load(store, "vec", "test")
    _, got = index.search_shards(shards, q, 10, 1)
    want = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got)])
    assert 0.3 < want < 0.99  # an index that misses some neighbours, so the check means something
    assert evaluation.index_recall(cfg, store, "vec", "test") == pytest.approx(want)


def test_index_a_parquet_folder_someone_else_wrote_and_name_the_columns_it_has(ray_local, local_cfg, tmp_path, capsys):
    """Ids + a list<float> column in hive folders, no manifest, no fct metadata: indexed as it is; a
    column that is not a vector column lists those that are; fct's own files without a manifest are
    an unfinished lake and refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from fct_dist import cli
    cfg = local_cfg("index.factory=Flat", "index.num_shards=2", "columns.id=item")
    rng = np.random.default_rng(5)
    x, ids = rng.normal(size=(300, 8)).astype(np.float32), np.arange(1000, 1300)
    theirs = tmp_path / "theirs"
    for k, sl in enumerate(np.array_split(np.arange(300), 3)):
        (theirs / f"day={k}").mkdir(parents=True)
        pq.write_table(pa.table({"item": ids[sl], "vec": pa.array(list(x[sl]), pa.list_(pa.float32())),
                                 "url": [f"u{i}" for i in sl]}), theirs / f"day={k}" / "part.parquet")
    args = ["index", "--preset", "tiny", "--set", f"storage.root={cfg.storage.root}", "--set", "index.factory=Flat",
            "--set", "columns.id=item", "--input", str(theirs)]
    assert cli.main([*args, "--column", "embb"]) == 2
    assert f"{theirs}: no vector column 'embb'; its vector columns are vec (choose one with --column)" in capsys.readouterr().err
    assert cli.main([*args, "--column", "vec"]) == 0
    store = open_store(cfg.storage)
    dist, got = index.search(store, "vec", "test", x[:20], 3, 1, column="vec", directory=f"{theirs}.index")
    flat = faiss.IndexFlatL2(8)
    flat.add(x)
    want_d, want = flat.search(x[:20], 3)
    np.testing.assert_array_equal(got, ids[want])
    np.testing.assert_allclose(dist, want_d, rtol=1e-5, atol=1e-5)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    prod = {"vec": {"model": "test", "version": "v", "dim": 8}}
    lake.write_part(store, str(unfinished / lake.part_name(0)), lake.embedding_table(ids, {"vec": x}, prod, "item"))
    assert cli.main([*args[:-1], str(unfinished), "--column", "vec"]) == 2
    assert "is not a finished dataset: _manifest.json is missing" in capsys.readouterr().err
