"""The CUDA and faiss-gpu paths, against their CPU twins; skipped where there is no GPU (the `gpu` mark,
see conftest), run by cluster/gpu-check.sh on a GPU machine."""
from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from fct_dist.models import Transformation, TransformationConfig
from fct_dist.pipeline import index
from fct_dist.pipeline.device import place

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-4), ("bf16", 5e-2)])
def test_h_placed_on_the_gpu_maps_like_h_on_the_cpu(precision, tol):
    torch.manual_seed(0)
    c = TransformationConfig(old_dim=16, side_dim=8, new_dim=32, branch=32, hidden=64)
    h = Transformation(c).eval()
    old, side = torch.randn(1000, 16), torch.randn(1000, 8)
    with torch.no_grad():
        want = h(old, side).numpy()
        twin = Transformation(c)
        twin.load_state_dict(h.state_dict())
        on_gpu, device, dtype = place(twin, precision)
        assert device.type == "cuda" and dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        got = on_gpu(old.to(device, dtype), side.to(device, dtype)).float().cpu().numpy()
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)


def test_a_faiss_gpu_index_finds_what_the_cpu_index_finds():
    assert faiss.get_num_gpus() > 0, "faiss is the CPU build on a GPU machine: install the [gpu] extra"
    rng = np.random.default_rng(0)
    x, q = rng.normal(size=(5000, 32)).astype(np.float32), rng.normal(size=(50, 32)).astype(np.float32)
    cpu = index.new_index("IVF16,Flat", 32)
    cpu.train(x)
    gpu = index.to_gpu(cpu, True)
    assert "Gpu" in type(gpu).__name__
    gpu.add_with_ids(x, np.arange(5000, dtype=np.int64) + 7)
    back = index.to_cpu(gpu)  # what index.build writes: trained and filled on the GPU, stored as a CPU index
    cpu.add_with_ids(x, np.arange(5000, dtype=np.int64) + 7)
    for idx in (back, cpu):
        index.set_nprobe(idx, 16)
    (d1, i1), (d2, i2) = back.search(q, 10), cpu.search(q, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-4)
