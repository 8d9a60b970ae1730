"""fct-dist: backfill-free embedding upgrades (Forward Compatible Training) on Ray, Parquet and FAISS."""
__version__ = "0.1.0"
