"""The benchmark wing: `fct bench` and the measurements behind the design, apart from the product.

    profiles.py    `fct bench`: backfill vs re-extraction on both distributors, per profile
    scale.py       `fct bench --profile scale`: tens of millions of rows through backfill, index, search
    fixtures.py    synthetic models and lakes of a profile (also used by the chaos soak and the tests)
    measure.py     CPU/memory of the process tree, steady rates, the plain pyarrow loop held against
    projection.py  measured per-item costs -> wall time and GPU-hours at 1B items
    report.py      bench.md and its plots
    tools/         one-off measurements behind decisions in docs/ (run as `python -m fct_dist.bench.tools.NAME`)
"""
