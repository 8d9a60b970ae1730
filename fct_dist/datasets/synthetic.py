"""Synthetic images with class-dependent, learnable patterns, for tests and scale runs."""
from __future__ import annotations

import numpy as np


def prototypes(num_classes: int, size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """One smooth random pattern per class: float (C, size, size, channels) in [0, 1]."""
    coarse = rng.random((num_classes, 4, 4, channels))
    rep = -(-size // 4)
    return np.repeat(np.repeat(coarse, rep, axis=1), rep, axis=2)[:, :size, :size]


def generate(labels: np.ndarray, size: int, channels: int, seed: int, classes_seed: int = 0) -> np.ndarray:
    """uint8 images (n, size, size[, 3]): the class pattern (drawn from `classes_seed`, so that every split
    shows the same classes), shifted, rescaled and noised per image (from `seed`)."""
    rng = np.random.default_rng(seed)
    protos = prototypes(int(labels.max()) + 1, size, channels, np.random.default_rng(classes_seed))
    shift = max(1, size // 8)
    out = np.empty((len(labels), size, size, channels), np.uint8)
    for i, c in enumerate(labels):
        dy, dx = rng.integers(-shift, shift + 1, 2)
        img = np.roll(protos[c], (dy, dx), axis=(0, 1)) * rng.uniform(0.6, 1.0)
        img = img + rng.normal(0, 0.15, img.shape)
        out[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return out[..., 0] if channels == 1 else out


def load(num_classes: int, train_per_class: int, test_per_class: int, size: int, channels: int,
         seed: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{split: (ids, images, labels)} with ids unique across splits."""
    out, next_id = {}, 0
    for k, (split, per) in enumerate((("train", train_per_class), ("test", test_per_class))):
        labels = np.random.default_rng(seed + 10 + k).permutation(np.repeat(np.arange(num_classes), per))
        out[split] = (np.arange(next_id, next_id + len(labels), dtype=np.int64),
                      generate(labels, size, channels, seed + 100 * (k + 1), classes_seed=seed),
                      labels.astype(np.int32))
        next_id += len(labels)
    return out


def jpeg_photos(n: int, height: int, seed: int) -> list[bytes]:
    """Photo-like JPEGs (height x 4/3 height, RGB, quality 90): a smooth colour field plus sensor
    noise, which compresses like a photograph (~100 KB at height 375)."""
    import io

    from PIL import Image
    rng = np.random.default_rng(seed)
    width, out = height * 4 // 3, []
    for _ in range(n):
        field = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
        img = np.asarray(field, np.float32) + rng.normal(0, 20, (height, width, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out
