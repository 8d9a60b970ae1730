"""A team's preprocessing, as its model card states it: fct's extraction equals the team's own torchvision
pipeline (Resize + CenterCrop, bilinear or bicubic, or a stretch) to the float, and models with different
input sizes are extracted in one pass, each image decoded once. The reference outputs were computed by
torchvision 0.29.1 itself (tests/data/torchvision_reference.py says how to remake them)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn
import yaml
from PIL import Image

from fct_dist import cli, image_lake, lake
from fct_dist.config import ConfigError
from fct_dist.datasets import synthetic
from fct_dist.models import exported
from fct_dist.storage import open_store

from .support import make_cfg

REFERENCE = np.load(Path(__file__).parent / "data" / "torchvision_reference.npz")
CASES = sorted(k.split("/", 1)[1] for k in REFERENCE.files if k.startswith("card/"))
IMAGES = sorted(k.split("/", 1)[1] for k in REFERENCE.files if k.startswith("image/"))
MEAN, STD = REFERENCE["mean"].tolist(), REFERENCE["std"].tolist()


def export_flatten(path: Path, fields: dict) -> None:
    """A model that returns its normalised input, flattened: its embedding is the preprocessed image."""
    s = fields["input_size"]
    program = torch.export.export(nn.Flatten().eval(), (torch.zeros(2, 3, s, s),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    card = {"name": path.stem, "version": "1", "channels": 3, "mean": MEAN, "std": STD, "output_dim": 3 * s * s,
            "draft": False} | fields
    (path.parent / f"{path.name}.card.yaml").write_text(yaml.safe_dump(card))


def image_lake_file(directory: Path, images: dict[int, bytes]) -> None:
    """A team's image lake: id, image, label and a URL column."""
    directory.mkdir(parents=True)
    ids = np.array(sorted(images))
    pq.write_table(pa.table({"id": ids, "image": pa.array([images[i] for i in ids], pa.binary()),
                             "label": pa.array(ids % 3, pa.int32()),
                             "url": [f"https://shop.example/{i}.jpg" for i in ids]}), directory / "part-0.parquet")


@pytest.fixture
def fct(tmp_path):
    root = tmp_path / "root"
    base = ["--preset", "tiny", "--set", f"storage.root={root}", "--set", "extract.distributor=local"]
    return lambda cmd, *args: cli.main([cmd, *base, *args])


def test_one_extract_of_four_cards_equals_torchvision_for_each(tmp_path, fct):
    """Four models whose cards differ (24 px by shorter-side bilinear, an odd crop margin, bicubic; 20 px
    stretched) extracted in one pass: each column equals the team's torchvision pipeline on the same image."""
    for case in CASES:
        export_flatten(tmp_path / f"{case}.pt2", json.loads(str(REFERENCE[f"card/{case}"])))
        assert fct("import-model", "--name", case, "--file", str(tmp_path / f"{case}.pt2")) == 0
    image_lake_file(tmp_path / "images", {i: REFERENCE[f"image/{n}"].tobytes() for i, n in enumerate(IMAGES)})
    assert fct("extract", *(x for c in CASES for x in ("--model", f"{c}={c}")), "--input", str(tmp_path / "images"),
               "--output", str(tmp_path / "out"), "--carry", "url") == 0
    store = open_store(make_cfg(str(tmp_path / "root")).storage)
    t = lake.read_lake(store, str(tmp_path / "out"), {"id": pa.int64()}).sort_by("id")
    assert t["id"].to_pylist() == list(range(len(IMAGES)))
    for case in CASES:
        want = np.stack([REFERENCE[f"out/{case}/{n}"].reshape(-1) for n in IMAGES])
        np.testing.assert_allclose(lake.to_numpy(t[case]), want, atol=1e-6, err_msg=case)
    # the label and the named column come along, row for row
    assert t["label"].to_pylist() == [i % 3 for i in range(len(IMAGES))]
    assert t["url"].to_pylist() == [f"https://shop.example/{i}.jpg" for i in range(len(IMAGES))]


def test_the_default_fit_is_not_torchvisions_resize_and_crop():
    """What the card's fields are for: fct's default (ImageOps.fit, bicubic, draft) gives other pixels than
    torchvision's Resize + CenterCrop on the same image, so a team must state its preprocessing."""
    data = REFERENCE[f"image/{IMAGES[0]}"].tobytes()
    default = image_lake.decode_ways(data, [image_lake.Preprocess(24, 32)])[0]
    x = (default.transpose(2, 0, 1) / np.float32(255) - np.array(MEAN, np.float32)[:, None, None]) / np.array(STD, np.float32)[:, None, None]
    assert np.abs(x - REFERENCE[f"out/resize-centercrop/{IMAGES[0]}"]).max() > 0.05


def test_models_of_different_sizes_in_one_pass_equal_separate_passes_jpeg_drafts_included(tmp_path, fct):
    """JPEGs that libjpeg may draft-decode: a 32 px model and an 8 px model (draft on) and a 16 px model (draft
    off) extracted together give each model exactly what its own pass gives."""
    photos = synthetic.jpeg_photos(6, 96, seed=3)  # 128 x 96 JPEGs
    image_lake_file(tmp_path / "images", dict(enumerate(photos)))
    models = {"big": {"input_size": 32, "draft": True}, "small": {"input_size": 8, "draft": True},
              "full": {"input_size": 16, "resize": 20, "resize_mode": "shorter", "interpolation": "bilinear"}}
    for name, fields in models.items():
        export_flatten(tmp_path / f"{name}.pt2", fields)
        assert fct("import-model", "--name", name, "--file", str(tmp_path / f"{name}.pt2")) == 0
    assert fct("extract", *(x for m in models for x in ("--model", m)), "--input", str(tmp_path / "images"),
               "--output", str(tmp_path / "together")) == 0
    store = open_store(make_cfg(str(tmp_path / "root")).storage)
    together = lake.read_lake(store, str(tmp_path / "together"), {"id": pa.int64()}).sort_by("id")
    for m in models:
        assert fct("extract", "--model", m, "--input", str(tmp_path / "images"), "--output", str(tmp_path / m)) == 0
        alone = lake.read_lake(store, str(tmp_path / m), {"id": pa.int64()}).sort_by("id")
        np.testing.assert_array_equal(lake.to_numpy(together[m]), lake.to_numpy(alone[m]), err_msg=m)
    # the draft did what it is for: the 8 px model saw a reduced-scale decode, not the full one
    full = Image.open(io.BytesIO(photos[0])).convert("RGB")
    undrafted = np.asarray(image_lake.Preprocess(8, draft=False).apply(full))
    drafted = image_lake.decode_ways(photos[0], [image_lake.Preprocess(8)])[0]
    assert not np.array_equal(drafted, undrafted)


@pytest.mark.parametrize("fields, message", [
    ({"resize_mode": "crop"}, "resize_mode is 'crop'; expected one of fit, shorter, stretch"),
    ({"interpolation": "area"}, "interpolation is 'area'; expected one of nearest, bilinear, bicubic, lanczos"),
    ({"resize": 32, "crop": "none"}, "crop none needs a square input_size x input_size image after resizing"),
])
def test_a_card_with_a_preprocessing_it_cannot_do_is_refused_naming_the_key(fields, message):
    card = {"name": "m", "version": "1", "input_size": 24, "output_dim": 4} | fields
    with pytest.raises(ConfigError, match=message):
        exported.read_card(yaml.safe_dump(card), "m.card.yaml")


def test_extract_refuses_a_carried_column_that_is_not_there(tmp_path, fct, caplog):
    export_flatten(tmp_path / "m.pt2", {"input_size": 8})
    assert fct("import-model", "--name", "m", "--file", str(tmp_path / "m.pt2")) == 0
    image_lake_file(tmp_path / "images", dict(enumerate(synthetic.jpeg_photos(2, 16, seed=0))))
    assert fct("extract", "--model", "m", "--input", str(tmp_path / "images"), "--output", str(tmp_path / "out"),
               "--carry", "sku") == 2
    assert "part-0.parquet: no column 'sku' to carry (columns.carry); columns present: id, image, label, url" in caplog.text
