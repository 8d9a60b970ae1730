#!/usr/bin/env bash
# GPU check of fct-dist on one GPU node: the `gpu`-marked tests, every training stage with Ray Train on CUDA (NCCL, bf16
# autocast), extract + backfill with GPU actors (checked against h on the CPU), and `fct bench` on the
# GPU: both profiles on both distributors, the I/O path, h's compute-only rate, and the production
# backfill with 1, 2, 4 and 8 actors sharing each GPU (rows/s per GPU).
# Usage: cluster/gpu-check.sh OUTDIR  (the package importable)
set -euo pipefail
out=${1:?usage: cluster/gpu-check.sh OUTDIR}
mkdir -p "$out"
root=$(mktemp -d)/root
gpus=$(nvidia-smi -L | wc -l)
# every GPU actor pool fits the node: two actors share each GPU
fct() { python3 -m fct_dist.cli "$@" --preset tiny --set storage.root="$root" --set train.num_workers=1 \
          --set extract.num_actors=$((2 * gpus)) --set extract.gpus_per_actor=0.5 \
          --set backfill.num_actors=$((2 * gpus)) --set backfill.gpus_per_actor=0.5; }
nvidia-smi -L
python3 -c "import torch, ray; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'ray', ray.__version__)"
# the tests marked `gpu` (skipped on CPU machines): h placed on CUDA and a faiss-gpu index against their CPU twins
python3 -m pytest -q -m gpu tests 2>&1 | tee "$out"/gpu-tests.txt
fct data
for stage in train-old train-side-info train-new "train-new --bct" train-transformation "train-transformation --no-side"; do
  fct $stage
done
fct extract --model old --model side --name stored --split test
fct backfill --model fct
python3 - "$root" <<'PY'
import sys, numpy as np, pyarrow as pa, torch
from fct_dist import lake
from fct_dist.config import Storage
from fct_dist.models import registry
from fct_dist.storage import open_store
store = open_store(Storage(root=sys.argv[1]))
src = lake.read_lake(store, store.path("embeddings/stored/test"), {"id": pa.int64()}).sort_by("id")
out = lake.read_lake(store, store.path("embeddings/fct/test"), {"id": pa.int64()}).sort_by("id")
h, meta = registry.load(store, "fct")
with torch.no_grad():
    ref = h(torch.tensor(lake.to_numpy(src["old"])), torch.tensor(lake.to_numpy(src["side"]))).numpy()
err = np.abs(lake.to_numpy(out["emb"]) - ref).max()
print("GPU backfill (fp32) vs CPU h: max abs diff", err, "rows", out.num_rows, "of", src.num_rows)
assert out.num_rows == src.num_rows and err < 1e-3
for name in ("old", "new", "bct", "fct"):
    print(name, {k: v for k, v in registry.read_meta(store, name)["metrics"].items() if k != "history"})
PY
python3 -m fct_dist.cli bench --set storage.root="$root" --set bench.rows=2000000 \
  --set "bench.scale_rows=[1000000, 2000000]" --set bench.rows_per_file=100000 \
  --set extract.num_actors=$gpus --set extract.gpus_per_actor=1 --set extract.cpus_per_actor=2 \
  --set extract.batch_size=1024 \
  --set backfill.num_actors=$((2 * gpus)) --set backfill.gpus_per_actor=0.5 --set backfill.cpus_per_actor=1 \
  --set backfill.files_in_flight=2 \
  --set backfill.batch_size=65536 --set backfill.precision=bf16
cp "$root"/reports/bench-*/* "$out"/
