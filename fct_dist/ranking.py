"""Retrieval metrics over arrays (FCT's protocol): CMC top-k and mAP of queries against a gallery, from
the exact full ranking or from a FAISS search's top-k neighbour ids.

Query set = gallery set is allowed: each query's own item is excluded. L2 on unnormalised features; ties
in distance are broken by gallery order (as a stable sort does), as the reference tests do. Queries with no
same-class item in the gallery are left out of both metrics and counted.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import lake


def pad(x: np.ndarray, d: int) -> np.ndarray:
    """(n, d0) -> (n, d) with zeros after the d0 columns (d0 < d; otherwise x as it is)."""
    return np.pad(x, ((0, 0), (0, d - x.shape[1]))) if x.shape[1] < d else x


BLOCK_BYTES_PER_CELL = 8  # a block's distances (4) and their sorted copy (4)


def exact_ranking(q: np.ndarray, q_labels: np.ndarray, q_ids: np.ndarray, g: np.ndarray, g_labels: np.ndarray,
                  g_ids: np.ndarray, max_rank: int, block_size: int) -> dict:
    """CMC[1..max_rank] and mAP over the full ranking, in blocks of queries of one class.

    Float32 distances tie often in a large gallery; a tie is broken by gallery order (see positive_places)."""
    d = max(q.shape[1], g.shape[1])  # a smaller-dim side is zero-padded (only the incompatible case)
    qt, gt = torch.tensor(pad(q, d)), torch.tensor(pad(g, d))
    g_sq = (gt * gt).sum(1)
    g_lab, q_lab = np.asarray(g_labels, np.int64), np.asarray(q_labels, np.int64)
    own = {int(x): i for i, x in enumerate(g_ids)}  # the query's own item in the gallery, if any

    def block(rows: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        qb = qt[rows]
        dist = torch.addmm(g_sq[None], qb, gt.T, alpha=-2).add_((qb * qb).sum(1, keepdim=True))  # (b, n)
        mine = [(r, own[int(i)]) for r, i in enumerate(q_ids[rows]) if int(i) in own]
        if mine:  # the query itself sorts after every finite distance and is not counted
            dist[[r for r, _ in mine], [c for _, c in mine]] = float("inf")
        return positive_ranks(dist.add_(0.0).numpy(), pos)  # + 0.0: a -0.0 becomes 0.0, which it equals

    blocks = [(rows_c[s:s + block_size], pos) for c in np.unique(q_lab)
              for rows_c, pos in [(np.flatnonzero(q_lab == c), np.flatnonzero(g_lab == c))]
              for s in range(0, len(rows_c) if len(pos) else 0, block_size)]
    # numpy's sort runs on one core and frees the GIL: blocks in threads, as many as cores and ~4 GiB allow
    workers = max(1, min(os.cpu_count() or 1, (4 << 30) // (BLOCK_BYTES_PER_CELL * block_size * max(1, len(g)))))
    with ThreadPoolExecutor(workers) as pool:
        firsts, aps = zip(*pool.map(lambda b: block(*b), blocks)) if blocks else ((), ())
    first, ap = (np.concatenate(x) if x else np.zeros(0) for x in (firsts, aps))
    counted = len(ap)
    hits = [int((first <= k + 1).sum()) for k in range(max_rank)]
    return {"cmc": (np.array(hits) / max(1, counted)).tolist(), "map": float(ap.sum()) / max(1, counted),
            "queries": counted, "queries_without_match": int(len(q) - counted), "method": "exact"}


def positive_ranks(dist: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rank of the first positive, AP) of each row of `dist` (b, n) that has a positive at a finite distance;
    `pos` are the gallery columns (ascending) of the rows' class."""
    at = positive_places(dist, pos)
    n_neg = at - np.arange(len(pos))  # negatives ranked before each positive
    n_pos = len(pos) - np.isinf(dist[:, pos]).sum(1)  # the query's own item (inf, last) is not counted
    j = np.arange(1, len(pos) + 1, dtype=np.float64)
    precision = np.where(j <= n_pos[:, None], j / (j + n_neg), 0.0)
    valid = n_pos > 0
    return (n_neg[:, 0] + 1)[valid], (precision.sum(1) / np.maximum(n_pos, 1))[valid]


MANY_TIES = 16  # tied positives in a row above which one stable argsort of the row beats a slice per tie


def positive_places(dist: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """(b, P): each row's positives' places in its ranking (distance, then gallery column), ascending.

    A positive's place is the count of distances below its own in the row's sorted distances, plus, where
    its distance occurs more than once (float32 distances of 20k items tie in about every other row), the
    tied items of a lower column: a float32 sort, not one of 64-bit (distance, column) keys nor a stable
    argsort, which took 2x and ~10x as long."""
    ranked = np.sort(dist, axis=1)
    d = np.ascontiguousarray(dist[:, pos])  # (b, P)
    place = torch.searchsorted(torch.from_numpy(ranked), torch.from_numpy(d)).numpy()
    # d itself is at `place`: the next distance equals it where it ties (the last item meets itself, counting 0)
    after = np.take_along_axis(ranked, np.minimum(place + 1, dist.shape[1] - 1), axis=1)
    tied = after == d
    many = tied.sum(axis=1) > MANY_TIES
    for r in np.flatnonzero(many):  # e.g. a collapsed model's equal vectors: the row's stable argsort
        order = np.empty(dist.shape[1], np.intp)
        order[np.argsort(dist[r], kind="stable")] = np.arange(dist.shape[1])
        place[r] = order[pos]
    for r, j in zip(*np.nonzero(tied & ~many[:, None])):  # a few per row: one slice each
        place[r, j] += np.count_nonzero(dist[r, :pos[j]] == d[r, j])
    return np.sort(place, axis=1)


def ranking_from_neighbours(nbr_ids: np.ndarray, q_labels: np.ndarray, q_ids: np.ndarray, g_labels: np.ndarray,
                            g_ids: np.ndarray, max_rank: int) -> dict:
    """The same metrics from top-k neighbour ids (FAISS search); mAP is then mAP@k."""
    order = np.argsort(g_ids)
    sorted_ids, sorted_labels = g_ids[order], g_labels[order]

    def label_of(ids: np.ndarray) -> np.ndarray:  # -1 where the id is not in the gallery
        pos, found = lake.find(sorted_ids, ids)
        return np.where(found, sorted_labels[pos], -1)

    nbr_labels = np.where(nbr_ids >= 0, label_of(nbr_ids), -1)
    keep = (nbr_ids != q_ids[:, None]) & (nbr_ids >= 0)
    match = (nbr_labels == q_labels[:, None]) & keep
    class_sizes = dict(zip(*np.unique(g_labels, return_counts=True)))
    n_pos = np.array([class_sizes.get(c, 0) for c in q_labels]) - (label_of(q_ids) == q_labels)
    valid = n_pos > 0
    rank = keep.cumsum(1)
    precision = match.cumsum(1) / np.maximum(rank, 1)
    ap = (precision * match).sum(1) / np.maximum(np.minimum(n_pos, keep.sum(1)), 1)
    first = np.where(match, rank, np.iinfo(np.int64).max).min(1)
    cmc = [float((first[valid] <= k + 1).mean()) for k in range(max_rank)]
    return {"cmc": cmc, "map": float(ap[valid].mean()), "queries": int(valid.sum()),
            "queries_without_match": int((~valid).sum()), "method": f"faiss top-{nbr_ids.shape[1]} (mAP@k)"}
