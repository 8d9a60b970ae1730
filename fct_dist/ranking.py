"""Retrieval metrics over arrays (FCT's protocol): CMC top-k and mAP of queries against a gallery, from
the exact full ranking or from a FAISS search's top-k neighbour ids.

Query set = gallery set is allowed: each query's own item is excluded. L2 on unnormalised features; ties
in distance are broken by gallery order (a stable sort), as the reference tests do. Queries with no
same-class item in the gallery are left out of both metrics and counted.
"""
from __future__ import annotations

import numpy as np
import torch

from . import lake


def pad(x: np.ndarray, d: int) -> np.ndarray:
    """(n, d0) -> (n, d) with zeros after the d0 columns (d0 < d; otherwise x as it is)."""
    return np.pad(x, ((0, 0), (0, d - x.shape[1]))) if x.shape[1] < d else x


def exact_ranking(q: np.ndarray, q_labels: np.ndarray, q_ids: np.ndarray, g: np.ndarray, g_labels: np.ndarray,
                  g_ids: np.ndarray, max_rank: int, block_size: int) -> dict:
    """CMC[1..max_rank] and mAP over the full ranking, computed in blocks of queries."""
    d = max(q.shape[1], g.shape[1])  # a smaller-dim side is zero-padded (only the incompatible case)
    qt, gt = torch.tensor(pad(q, d)), torch.tensor(pad(g, d))
    gl = torch.from_numpy(np.asarray(g_labels, np.int64))
    g_sq = (gt * gt).sum(1)
    own = {int(x): i for i, x in enumerate(g_ids)}  # the query's own item in the gallery, if any
    hits, ap_sum, counted = np.zeros(max_rank), 0.0, 0
    for s in range(0, len(q), block_size):
        qb, lab = qt[s:s + block_size], torch.from_numpy(np.asarray(q_labels[s:s + block_size], np.int64))
        dist = torch.addmm(g_sq[None], qb, gt.T, alpha=-2).add_((qb * qb).sum(1, keepdim=True))  # (b, n)
        rows = [(r, own[int(i)]) for r, i in enumerate(q_ids[s:s + block_size]) if int(i) in own]
        if rows:  # the query itself sorts last and is then dropped
            dist[[r for r, _ in rows], [c for _, c in rows]] = float("inf")
        order = torch.sort(dist, dim=1, stable=True).indices
        match = gl[order] == lab[:, None]
        if rows:
            match[[r for r, _ in rows], -1] = False
        n_pos = match.sum(1)
        valid = n_pos > 0
        # precision only where the hits are (a ~1/classes share of the row): int32 counts, float64 sums
        r, c = match.nonzero(as_tuple=True)
        hits_so_far = match.cumsum(1, dtype=torch.int32)[r, c].double()
        ap = torch.zeros(len(lab), dtype=torch.float64).index_add_(0, r, hits_so_far / (c + 1)) / n_pos.clamp(min=1)
        first = match.to(torch.uint8).argmax(1) + 1  # rank of the first hit (rows without one are not counted)
        ap_sum += float(ap[valid].sum())
        counted += int(valid.sum())
        for k in range(max_rank):
            hits[k] += int((first[valid] <= k + 1).sum())
    return {"cmc": (hits / max(1, counted)).tolist(), "map": ap_sum / max(1, counted),
            "queries": counted, "queries_without_match": int(len(q) - counted), "method": "exact"}


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
