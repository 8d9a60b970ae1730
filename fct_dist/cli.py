"""`fct <stage>`: thin command-line callers of the library's stage functions."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Callable

import numpy as np

from . import config as config_mod
from . import runtime
from . import __version__
from .config import Config, ConfigError
from .lake import LakeError
from .layout import OLD
from .models.artefact import ArtefactError
from .storage import Store, StorageError, open_store

# The project's own errors (and a missing file named on the command line): one line, exit 2. Anything
# else is a bug and keeps its traceback.
CLEAR_ERRORS = (ConfigError, LakeError, StorageError, ArtefactError, FileNotFoundError)
# optional packages a command may need, and the install that brings them
EXTRAS = {"faiss": "pip install 'fct-dist[cpu]' (faiss-cpu) or 'fct-dist[gpu]' (faiss-gpu, CUDA machines)"}
log = logging.getLogger("fct_dist")


def _data(cfg: Config, store: Store, a) -> None:
    from . import datasets
    if a.from_folder:
        cfg.data.source, cfg.data.folder = "folder", a.from_folder
    datasets.fill(cfg, store, force=a.force)


def _train(stage: str):
    def run(cfg: Config, store: Store, a) -> None:
        from .train import stages
        if stage == "old":
            stages.train_old(cfg, store, force=a.force)
        elif stage == "side":
            stages.train_side_info(cfg, store, force=a.force)
        elif stage == "new":
            if a.bct and stages.bct_needs_old_embeddings(store):  # BCT's class means need them
                from .pipeline import extract
                extract.reextract(cfg, store, OLD, "train")
            stages.train_new(cfg, store, bct=a.bct, force=a.force)
        else:
            from .api import fit_transformation
            fit_transformation(cfg, store, a.features, a.no_side, a.force)
    return run


def _extract(cfg: Config, store: Store, a) -> None:
    from .pipeline import extract
    models = dict(m.split("=", 1) if "=" in m else (m, m) for m in a.model)
    cfg.columns.carry = [*cfg.columns.carry, *(c for c in a.carry if c not in cfg.columns.carry)]
    extract.extract(cfg, store, a.split, models, a.name or "-".join(models.values()), a.input, a.output)


def _import_model(cfg: Config, store: Store, a) -> None:
    from .models import exported
    meta = exported.import_model(store, a.name, a.file, a.card)
    log.info("models/%s: %s %s, version %s, %s -> %d-dim embeddings", a.name, meta["card"]["name"],
             meta["card"]["version"], meta["version"], meta["preprocess"], meta["dims"]["emb"])


def _backfill(cfg: Config, store: Store, a) -> None:
    from .pipeline import backfill
    backfill.backfill(cfg, store, a.model, a.split, a.input, a.output)


def _refill(cfg: Config, store: Store, a) -> None:
    from .pipeline import refill
    refill.refill(cfg, store, a.budget, a.split, a.input, a.output)


def _index(cfg: Config, store: Store, a) -> None:
    from .pipeline import index
    index.build(cfg, store, a.lake, a.split, a.column, a.input, a.output)


def _search(cfg: Config, store: Store, a) -> None:
    from . import search
    from .pipeline import index
    if a.vectors:
        queries = np.load(a.vectors).astype(np.float32)
        names = [f"query {row}" for row in range(len(queries))]
        d, i = index.search(store, a.lake, a.split, queries, a.k, cfg.index.nprobe,
                            directory=store.resolve(a.index) if a.index else None)
    else:
        ids = a.ids or search.spread_ids(store, a.split, 5).tolist()
        q, d, i = search.query(store, a.model, a.lake, a.split, ids, a.k, cfg.index.nprobe)
        names = [f"query {x} (label {y})" for x, y in zip(q.ids, q.labels)]
        if a.plot:
            with open(a.plot, "wb") as f:
                f.write(search.draw(store, a.split, q, d, i, f"{a.model} queries / {a.lake} gallery"))
            log.info("picture of the search: %s", a.plot)
    for row, name in enumerate(names):
        print(f"{name}: " + " ".join(f"{int(x)}({dist:.3g})" for x, dist in zip(i[row], d[row]) if x >= 0))


def _evaluate(cfg: Config, store: Store, a) -> None:
    from . import evaluation
    if a.features:
        evaluation.features_matrix(cfg, store, a.features)
    else:
        evaluation.matrix(cfg, store)


def _upgrade(cfg: Config, store: Store, a) -> None:
    from . import runner
    runner.upgrade(cfg, store, seeds=a.seeds, force=a.force)


def _gc(cfg: Config, store: Store, a) -> None:
    from . import snapshots
    grace = cfg.backfill.gc_grace_seconds if a.grace is None else a.grace
    c = snapshots.collect(store, store.resolve(a.lake), grace, cfg.backfill.lease_seconds)
    log.info("gc %s: %d files deleted (%.1f MB), %d unlisted files kept (younger than %g s)", a.lake, c["deleted"],
             c["bytes"] / 1e6, c["kept_young"], grace)


def _bench(cfg: Config, store: Store, a) -> None:
    if a.profile == "scale":
        from .bench import scale
        scale.run(cfg, store)
    else:
        from .bench import profiles
        profiles.run(cfg, store)


class Help(argparse.HelpFormatter):
    """Shows each option's default, where it has one its help does not already name."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in h:
            h += " (default: %(default)s)"
        return h


def positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer (N >= 1)")
    return n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fct", description="Backfill-free embedding upgrades (FCT) on Ray.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML config (default: the embedded defaults)")
    common.add_argument("--preset", help="overlay a named preset (e.g. tiny)")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    common.add_argument("-v", "--verbose", action="store_true", help="also show Ray's own output and debug lines")
    common.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="cmd", required=True)

    def cmd(name: str, fn, help: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, parents=[common], help=help, formatter_class=Help)
        s.set_defaults(fn=fn)
        return s

    for commands in (_data_and_models, _lakes, _runs):
        commands(cmd)
    return p


Command = Callable[[str, Callable, str], argparse.ArgumentParser]


def _data_and_models(cmd: Command) -> None:
    """fct data, the training stages, import-model."""
    s = cmd("data", _data, "fill the image lake")
    s.add_argument("--from-folder", help="DIR/<class>/*.png|jpg")
    s.add_argument("--force", action="store_true", help="refill even when the image lake is current")
    for name, stage, help in (("train-old", "old", "train the old model"),
                              ("train-side-info", "side", "train the side-info model"),
                              ("train-new", "new", "train the new model (or the BCT baseline)"),
                              ("train-transformation", "h", "extract the features (old, side, new), train h(old, side) -> new")):
        s = cmd(name, _train(stage), help)
        s.add_argument("--force", action="store_true", help="retrain even when the artefact is current")
        if stage == "new":
            s.add_argument("--bct", action="store_true", help="train BCT's compatible baseline instead")
        if stage == "h":
            s.add_argument("--no-side", action="store_true", help="the ablation without side-info")
            s.add_argument("--features", metavar="URI", help="train on this features lake (URI/train, URI/test: id, "
                           "old, side, new vectors named by `columns`; or iceberg://NS.NAME: tables NAME_train, NAME_test) instead of "
                           "extracting fct's own")
    s = cmd("import-model", _import_model, "register an exported model (.pt2) and its model card as an artefact")
    s.add_argument("--name", required=True, help="artefact name (old, side, new: what the stages use)")
    s.add_argument("--file", required=True, metavar="URI", help="the torch.export program (.pt2, batch dim dynamic)")
    s.add_argument("--card", metavar="URI", help="its model card (default FILE.card.yaml)")


def _lakes(cmd: Command) -> None:
    """The data-parallel stages over lakes, and search."""
    s = cmd("extract", _extract, "embed images with one or more models")
    s.add_argument("--model", action="append", required=True, metavar="[COLUMN=]MODEL",
                   help="a model artefact to embed with, its vectors in COLUMN (default: the model's name); repeat")
    s.add_argument("--split", default="test", help="the image lake's split")
    s.add_argument("--name", help="output lake name (default: the model names)")
    s.add_argument("--input", metavar="URI", help="image lake to read instead of images/SPLIT: Parquet with the "
                   "columns.id and columns.image columns, an Iceberg table (iceberg://NS.TABLE[@SNAPSHOT]), or a folder of "
                   "images named by id (000123.jpg)")
    s.add_argument("--output", metavar="URI", help="embedding lake to write, or an Iceberg table (iceberg://NS.TABLE, "
                   "one commit) (default: embeddings/NAME/SPLIT)")
    s.add_argument("--carry", action="append", default=[], metavar="COLUMN", help="a column of the --input lake to "
                   "copy into the output (a URL, a product id; its columns.label is always copied); repeat")
    s = cmd("backfill", _backfill, "stored (old, side) lake -> h -> new lake, no image read")
    s.add_argument("--model", default="fct", help="transformation artefact (fct or fct-noside)")
    s.add_argument("--split", default="test", help="the stored lake's split")
    s.add_argument("--input", metavar="URI", help="stored lake, or an Iceberg table iceberg://NS.TABLE[@SNAPSHOT] "
                   "(default: embeddings/stored/SPLIT under storage.root)")
    s.add_argument("--output", metavar="URI", help="new lake (default: embeddings/MODEL/SPLIT under storage.root; "
                   "rejected rows then go to URI.rejected), or an Iceberg table iceberg://NS.TABLE (one commit)")
    s = cmd("refill", _refill, "re-extract the budget of the backfilled gallery h is least sure of (FastFill)")
    s.add_argument("--budget", type=float, metavar="F", help="fraction of the gallery to re-extract, 0..1 "
                   "(default: refill.budget)")
    s.add_argument("--split", default="test", help="the gallery's split")
    s.add_argument("--input", metavar="URI", help="backfilled gallery with an uncertainty column, or its Iceberg table (default: "
                   "embeddings/fct/SPLIT under storage.root)")
    s.add_argument("--output", metavar="URI", help="gallery lake to write (default: embeddings/refill/SPLIT)")
    s = cmd("index", _index, "build a sharded FAISS index from an embedding lake")
    s.add_argument("--lake", default="fct", help="the embedding lake under storage.root/embeddings")
    s.add_argument("--split", default="test", help="its split")
    s.add_argument("--column", default="emb", help="the vector column")
    s.add_argument("--input", metavar="URI", help="an embedding lake (e.g. a backfill --output; a Parquet folder, "
                   "or an Iceberg table iceberg://NS.TABLE[@SNAPSHOT])")
    s.add_argument("--output", metavar="URI", help="where the index goes (default: INPUT.index)")
    s = cmd("search", _search, "top-k search of the sharded index")
    s.add_argument("--lake", default="fct", help="the indexed lake under storage.root/embeddings")
    s.add_argument("--split", default="test", help="its split")
    s.add_argument("--k", type=positive, default=10, help="neighbours per query")
    s.add_argument("--vectors", help=".npy file of query vectors (n, d)")
    s.add_argument("--model", default="new", help="embed query images with this model")
    s.add_argument("--ids", type=int, nargs="*", default=[], help="image ids (of --split) to use as queries "
                   "(default: 5 spread over the split)")
    s.add_argument("--plot", metavar="PNG", help="draw the queries and their neighbours into this PNG")
    s.add_argument("--index", metavar="URI", help="search this index (an index --output) with --vectors")


def _runs(cmd: Command) -> None:
    """evaluate, the whole upgrade, gc, bench."""
    s = cmd("evaluate", _evaluate, "the compatibility matrix (CMC top-k, mAP)")
    s.add_argument("--features", metavar="URI", help="evaluate on this features lake's test split (needs columns.label; "
                   "iceberg://NS.NAME: table NAME_test)")
    s = cmd("upgrade", _upgrade, "every stage in order, then the report")
    s.add_argument("--seeds", type=positive, default=1, help="repeat the training stages with N seeds (N >= 1)")
    s.add_argument("--force", action="store_true", help="refill the image lake and retrain every model (the "
                   "data-parallel stages then rerun because their inputs changed)")
    s = cmd("gc", _gc, "delete the files of a lake that neither its current nor its previous snapshot lists")
    s.add_argument("--lake", required=True, metavar="URI", help="an embedding lake written by fct (a folder with "
                   "_manifest.json)")
    s.add_argument("--grace", type=float, metavar="SECONDS", help="keep unlisted files younger than this "
                   "(default: backfill.gc_grace_seconds); 0 deletes every unlisted file")
    s = cmd("bench", _bench, "backfill vs full re-extraction, each also without Ray; scaling; 1B projection")
    s.add_argument("--profile", choices=("compare", "scale"), default="compare",
                   help="compare: backfill vs re-extraction (demo and production sizes); scale: tens of millions of "
                   "rows through backfill, IVF-PQ index and search (bench.scale)")


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    t0 = time.time()
    runtime.setup_logging(logging.DEBUG if a.verbose else logging.WARNING if a.quiet else logging.INFO)
    try:
        cfg = config_mod.load(a.config, a.set, a.preset)
        a.fn(cfg, open_store(cfg.storage, check=True), a)
    except CLEAR_ERRORS as e:
        log.error("fct %s: error: %s", a.cmd, e)
        return 2
    except ModuleNotFoundError as e:
        if e.name not in EXTRAS:
            raise
        log.error("fct %s: error: this command needs the %s package, which is not installed: %s", a.cmd, e.name,
                  EXTRAS[e.name])
        return 2
    except Exception as e:  # Ray wraps a stage's own error; surface its message
        cause = e
        while not isinstance(cause, CLEAR_ERRORS) and (cause.__cause__ or getattr(cause, "cause", None)):
            cause = cause.__cause__ or cause.cause
        if isinstance(cause, CLEAR_ERRORS):
            log.error("fct %s: error: %s", a.cmd, cause)
            return 2
        raise
    log.info("fct %s: done in %.1f s", a.cmd, time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
