"""Writes torchvision_reference.npz: images decoded and preprocessed by torchvision itself, what a team's
own pipeline computes, for tests/test_preprocess.py to hold fct's extraction to. torchvision does not
import beside the CPU torch this project pins, so the reference is made once in a venv of its own:

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 pillow numpy
    /tmp/tv/bin/python tests/data/torchvision_reference.py
"""
import io
import json
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# card fields -> the torchvision pipeline a team would write for them
CASES = {
    "resize-centercrop": ({"input_size": 24, "resize": 32, "resize_mode": "shorter", "interpolation": "bilinear"},
                          T.Compose([T.Resize(32), T.CenterCrop(24)])),
    "resize-odd-margin": ({"input_size": 24, "resize": 27, "resize_mode": "shorter", "interpolation": "bilinear"},
                          T.Compose([T.Resize(27), T.CenterCrop(24)])),
    "bicubic": ({"input_size": 24, "resize": 30, "resize_mode": "shorter", "interpolation": "bicubic"},
                T.Compose([T.Resize(30, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(24)])),
    "stretch": ({"input_size": 20, "resize": 20, "resize_mode": "stretch", "interpolation": "bilinear", "crop": "none"},
                T.Resize((20, 20))),
}


def images() -> dict[str, bytes]:
    """Noise over gradients (no symmetry to hide a transposed or off-centre crop): wide and tall, PNG and JPEG."""
    rng, out = np.random.default_rng(0), {}
    for name, (h, w), fmt in (("wide.png", (43, 61), "PNG"), ("tall.jpg", (57, 40), "JPEG"), ("odd.jpg", (37, 50), "JPEG")):
        grad = np.add.outer(np.linspace(0, 120, h), np.linspace(0, 100, w))[..., None] * [1.0, 0.6, 0.3]
        pixels = np.clip(grad + rng.integers(0, 120, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out[name] = buf.getvalue()
    return out


def main() -> None:
    arrays = {"torchvision": np.array(torchvision.__version__), "mean": np.array(MEAN), "std": np.array(STD)}
    for name, data in images().items():
        arrays[f"image/{name}"] = np.frombuffer(data, np.uint8)
        for case, (card, resize) in CASES.items():
            team = T.Compose([resize, T.ToTensor(), T.Normalize(MEAN, STD)])  # the team's own pipeline
            x = team(Image.open(io.BytesIO(data)).convert("RGB"))
            arrays[f"out/{case}/{name}"] = x.numpy().astype(np.float32)
    for case, (card, _) in CASES.items():
        arrays[f"card/{case}"] = np.array(json.dumps(card))
    np.savez_compressed(Path(__file__).with_suffix(".npz"), **arrays)
    print(f"torchvision {torchvision.__version__}, torch {torch.__version__}: {len(arrays)} arrays")


if __name__ == "__main__":
    main()
