"""`fct refill --budget F`: re-extract, with the new model, the fraction F of a backfilled gallery that
h is least sure of (FastFill), into a gallery lake where those ids carry the new model's embedding and
every other id h's.

The selection needs no driver-side sort. Rows are ranked by a 96-bit key: uncertainty descending, then
id ascending (ties are broken the same way on every run). The k = round(F n) smallest keys are found
by a radix select: each pass, workers histogram the next 16 bits of the keys that share the prefix
fixed so far (one task per group of files) and the driver sums the 65,536 counts to fix those bits;
at most six passes, two when no two rows share an uncertainty. Then the per-file engine maps every
file, each selecting its own rows by comparing keys with the threshold: exactly k rows in all, each
file exactly once (see filemap.py), its images read by id from the image lake.
"""
from __future__ import annotations

import functools
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .. import currency, lake, layout, tables
from ..config import Columns, Config
from ..currency import digest
from ..lake import LakeError
from ..layout import FCT, NEW, REFILL
from ..models import registry
from ..storage import Store
from . import distribute, filemap
from .extract import ExtractFn
from .filejob import FileJob
from .plan import id_range

log = logging.getLogger(__name__)
DIGITS, BITS = 6, 16  # the key's 96 bits as six 16-bit digits, most significant first
Threshold = tuple[int, int] | None  # (a, b): rows with key <= (a, b) are selected; None: no row


def keys(ids: np.ndarray, uncertainty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) per row, ascending in the order of re-extraction: a = uncertainty descending (float32 bits
    mapped to an order-preserving uint32, then flipped), b = id ascending (int64 -> order-preserving uint64)."""
    u = np.ascontiguousarray(uncertainty, np.float32).view(np.uint32)
    ordered = np.where(u >> 31 == 1, ~u, u | np.uint32(1 << 31))  # larger float -> larger uint32
    return ~ordered, np.asarray(ids, np.int64).view(np.uint64) ^ np.uint64(1 << 63)


def digits(a: np.ndarray, b: np.ndarray, level: int) -> np.ndarray:
    """The key's `level`-th 16-bit digit (0 = most significant)."""
    word, shift = (a.astype(np.uint64), 16 - 16 * level) if level < 2 else (b, 48 - 16 * (level - 2))
    return ((word >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.int64)


def read_keys(store: Store, path: str, cols: Columns) -> tuple[np.ndarray, np.ndarray]:
    """One file's keys; a NaN uncertainty is an error naming the file and id."""
    try:
        with store.fs.open_input_file(path) as f:
            t = pq.read_table(f, columns=[cols.id, cols.uncertainty])
    except (OSError, pa.ArrowException) as e:
        raise lake.read_error(e, store.uri(path)) from None
    ids, s = t[cols.id].to_numpy(), t[cols.uncertainty].to_numpy(zero_copy_only=False).astype(np.float32)
    if np.isnan(s).any():
        raise LakeError(f"{store.uri(path)}: id {int(ids[np.isnan(s)][0])}: {cols.uncertainty!r} is NaN")
    return keys(ids, s)


def histogram(store: Store, paths: list[str], cols: Columns, prefix: list[int]) -> np.ndarray:
    """Counts of the next digit among the rows of `paths` whose first digits equal `prefix`."""
    out = np.zeros(1 << BITS, np.int64)
    for path in paths:
        a, b = read_keys(store, path, cols)
        keep = np.ones(len(a), bool)
        for level, v in enumerate(prefix):
            keep &= digits(a, b, level) == v
        out += np.bincount(digits(a[keep], b[keep], len(prefix)), minlength=1 << BITS)
    return out


def threshold(cfg: Config, store: Store, paths: list[str], k: int) -> Threshold:
    """The key of the k-th row in re-extraction order (radix select over the files; see the module)."""
    if k == 0:
        return None
    n = min(len(paths), 64)  # tasks per pass: at most 64 histograms reach the driver, whatever the lake's size
    groups = [paths[i::n] for i in range(n)]
    prefix, need = [], k
    for level in range(DIGITS):
        h = sum(distribute.of(cfg, cfg.extract).map_groups(functools.partial(histogram, store, cols=cfg.columns, prefix=prefix), groups))
        cum = np.cumsum(h)
        v = int(np.searchsorted(cum, need))  # the first digit whose cumulative count reaches `need`
        need -= int(cum[v - 1]) if v else 0
        prefix.append(v)
        if h[v] == need:  # every row with this prefix is in: the rest of the key is free
            break
    full = prefix + [(1 << BITS) - 1] * (DIGITS - len(prefix))
    a = (full[0] << 16) | full[1]
    b = (full[2] << 48) | (full[3] << 32) | (full[4] << 16) | full[5]
    return a, b


def selected(ids: np.ndarray, uncertainty: np.ndarray, t: Threshold) -> np.ndarray:
    """Mask of the rows at or before the threshold in re-extraction order."""
    if t is None:
        return np.zeros(len(ids), bool)
    a, b = keys(ids, uncertainty)
    return (a < np.uint32(t[0])) | ((a == np.uint32(t[0])) & (b <= np.uint64(t[1])))


class RefillFn:
    """Selects a batch's rows by the threshold, reads their images by id from the image lake and embeds
    them with the new model; every other row keeps h's embedding. Each image file's id range is read
    once (its footer): a batch opens only the files whose range holds one of its ids, and within them
    Parquet's row-group statistics skip the rest."""

    def __init__(self, store: Store, t: Threshold, images: str, image_files: list[str], cols: Columns,
                 precision: str):
        self.store, self.t, self.cols, self.images = store, t, cols, images
        with ThreadPoolExecutor(16) as pool:
            footers = list(pool.map(functools.partial(lake.read_footer, store), image_files))
        unknown = (-(2**63), 2**63 - 1)  # a file without id statistics may hold any id
        self.ranges = [(p, id_range(f, cols.id) or unknown) for p, f in zip(image_files, footers)]
        self.embed = ExtractFn(store, {cols.out: NEW}, precision, cols.image)

    def images_of(self, ids: np.ndarray) -> pa.Table:
        """(id, image) rows of these ids from the files whose id range can hold them."""
        files = [p for p, (lo, hi) in self.ranges if ((ids >= lo) & (ids <= hi)).any()]
        if not files:
            return pa.table({self.cols.id: pa.array([], pa.int64()), self.cols.image: pa.array([], pa.binary())})
        return ds.dataset(files, format="parquet", filesystem=self.store.fs).to_table(
            columns=[self.cols.id, self.cols.image], filter=pc.field(self.cols.id).isin(pa.array(ids)))

    def __call__(self, rb: pa.RecordBatch):
        c = self.cols
        ids, emb = rb.column(c.id).to_numpy(), lake.to_numpy(rb.column(c.out))
        s = rb.column(c.uncertainty).to_numpy(zero_copy_only=False)
        pick = selected(ids, s, self.t)
        invalid, reasons = np.zeros(len(ids), bool), []
        if pick.any():
            found = self.images_of(ids[pick])
            order = np.argsort(found[c.id].to_numpy())
            got = found[c.id].to_numpy()[order]
            missing = np.setdiff1d(ids[pick], got)
            if len(missing) or len(got) != int(pick.sum()):
                raise LakeError(f"{self.store.uri(self.images)}: id {int(missing[0]) if len(missing) else got[0]}: "
                                f"{'not in' if len(missing) else 'more than once in'} the image lake, needed to "
                                "re-extract it")
            rows = found.take(order).take(np.searchsorted(got, ids[pick]))  # the selected rows' order
            bad, why, out = self.embed(pa.record_batch([rows[c.image].combine_chunks()], names=[c.image]))
            emb = emb.copy()
            emb[np.flatnonzero(pick)[~bad]] = out[c.out]
            invalid[np.flatnonzero(pick)[bad]] = True
            reasons = why
        keep = ~invalid
        return invalid, reasons, {c.out: emb[keep], c.uncertainty: s[keep].astype(np.float32), "reextracted": pick[keep]}


def refill_job(cfg: Config, store: Store, budget: float, split: str = "test", input: str | None = None,
               output: str | None = None) -> FileJob:
    """The refill of the backfilled gallery (default embeddings/fct/{split}) into embeddings/refill/{split}
    (or `input` / `output` URIs): the fraction `budget` with the highest uncertainty re-extracted by
    models/new from images/{split}. Checked before any work: the gallery has the uncertainty column, and
    models/new is the version h was trained to predict."""
    cols = cfg.columns if input else Columns()
    if not 0.0 <= budget <= 1.0:
        raise LakeError(f"budget {budget}: expected a fraction of the gallery between 0 and 1")
    in_dir = tables.locate(cfg, store, input) if input else layout.embeddings(store, FCT, split)
    out_dir = "" if tables.is_table(output) else store.resolve(output) if output else layout.embeddings(store, REFILL, split)
    manifest = currency.manifest(store, in_dir)  # a finished lake only: a half-written gallery is never refilled
    if lake.pinned(store, in_dir):  # a table of fct's output: its files say what made them
        files = lake.parts(store, in_dir)
        manifest = {"producer": lake.producer_of(lake.read_schema(store, files[0])),
                    "rows": sum(lake.read_footer(store, f).metadata.num_rows for f in files)}
    prod = manifest.get("producer", {})
    if cols.uncertainty not in prod:
        raise LakeError(f"{store.uri(in_dir)}: no {cols.uncertainty!r} column: it was backfilled by a transformation "
                        "without an uncertainty head (train it with models.transformation.uncertainty=true)")
    h_meta = registry.read_meta(store, prod[cols.out]["model"])
    new_meta = registry.read_meta(store, NEW)
    if h_meta["producers"].get("new") not in (None, new_meta["version"]):
        raise LakeError(f"models/{NEW} is version {new_meta['version']}, but {store.uri(in_dir)} was made by a "
                        f"transformation trained towards version {h_meta['producers']['new']}")
    paths = lake.parts(store, in_dir)
    k = round(budget * manifest["rows"])
    t = threshold(cfg, store, paths, k)
    images = layout.images(store, split)
    producer = {
        cols.out: {"model": REFILL, "version": digest(prod[cols.out]["version"], new_meta["version"], budget),
                   "dim": prod[cols.out]["dim"], "space": new_meta["version"],
                   "inputs": {"h": prod[cols.out]["version"], "new": new_meta["version"]},
                   "budget": budget, "rows_reextracted": k},
        cols.uncertainty: prod[cols.uncertainty],
        "reextracted": {"dim": 0, "type": "bool", "what": f"true: models/{NEW}'s embedding of the image; false: h's"}}
    log.info("[refill] re-extracting %d of %d rows (budget %.3f) of %s", k, manifest["rows"], budget, store.uri(in_dir))
    return FileJob(
        store=store, in_dir=in_dir, out_dir=out_dir,
        rejected_dir=f"{out_dir}.rejected" if output else layout.rejected(store, REFILL, split),
        expected={cols.id: pa.int64(), cols.out: prod[cols.out]["dim"], cols.uncertainty: pa.float32()},
        columns=[cols.id, cols.out, cols.uncertainty],
        make_fn=functools.partial(RefillFn, store, t, images, lake.parts(store, images), cols, cfg.extract.precision),
        producer=producer, fingerprint=digest(producer, t, lake.identity(store, images), cfg.extract.precision),
        actors=cfg.extract, id_col=cols.id, name="refill")


def refill(cfg: Config, store: Store, budget: float | None = None, split: str = "test", input: str | None = None,
           output: str | None = None) -> dict:
    """Re-extract the `budget` (default refill.budget) most uncertain rows of the gallery; see refill_job."""
    job = refill_job(cfg, store, cfg.refill.budget if budget is None else budget, split, input, output)
    return filemap.run_into(cfg, job, distribute.of(cfg, cfg.extract), output)
