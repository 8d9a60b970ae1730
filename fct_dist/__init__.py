"""fct-dist: backfill-free embedding upgrades (Forward Compatible Training) on Ray, Parquet and FAISS.

The stages as Python functions and h as a Ray Data callable: see `fct_dist.api` (re-exported here)."""
__version__ = "0.1.0"

from .api import (Transformation, backfill, evaluate, extract, import_model, index,  # noqa: E402,F401
                  session, train_transformation, upgrade)

__all__ = ["Transformation", "backfill", "evaluate", "extract", "import_model", "index", "session",
           "train_transformation", "upgrade"]
