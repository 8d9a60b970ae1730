"""A team's own models and lake, end to end: models exported here with torch.export (not fct's ResNets: an MLP
and a tiny ViT-like block) with their cards, a lake written the way Spark writes it (list<double>,
other column names, several snappy files, a _SUCCESS marker) on a real S3 endpoint, and the commands
of the README's "Your models, your lake"."""
from __future__ import annotations

import io
import json
import uuid
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn
import yaml
from PIL import Image
from pyiceberg.catalog import load_catalog

from fct_dist import cli, currency, datasets, evaluation, image_lake, lake, ranking
from fct_dist.datasets import folder, synthetic
from fct_dist.models import registry
from fct_dist.storage import open_store
from fct_dist.train import stages

from .support import make_cfg

COLUMNS = {"id": "item_id", "image": "jpeg", "label": "category", "old": "emb_v1", "side": "side_v1",
           "new": "emb_v2", "out": "emb_v2"}
SIZE = 16  # the lake's images
SIZES = {"old": 16, "side": 8, "new": 24}  # each model's input, as its card says
IN_DRIVER = ("--set", "train.num_workers=0")  # h trained in the test's process: Ray Train is covered by the first test


class MLP(nn.Module):
    """The team's old model and side-info encoder: flatten -> MLP."""

    def __init__(self, out: int, seed: int, channels: int = 3, size: int = SIZE):
        super().__init__()
        torch.manual_seed(seed)
        self.size = size
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, 32), nn.GELU(), nn.Linear(32, out))

    def forward(self, x):
        return self.net(x)


class TinyViT(nn.Module):
    """The team's new model: 4x4 patches -> one pre-norm self-attention + MLP block -> mean over tokens
    -> projection."""

    def __init__(self, out: int = 12, d: int = 16, size: int = SIZE):
        super().__init__()
        torch.manual_seed(2)
        self.size = size
        self.patch = nn.Conv2d(3, d, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, (size // 4) ** 2, d) * 0.1)
        self.norm1, self.qkv = nn.LayerNorm(d), nn.Linear(d, 3 * d)
        self.norm2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, out)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # (B, tokens, d)
        q, k, v = self.qkv(self.norm1(t)).chunk(3, dim=-1)
        t = t + torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1) @ v
        t = t + self.mlp(self.norm2(t))
        return self.head(t.mean(1))


def card(name: str, dim: int, **over) -> dict:
    """A card for torchvision-style preprocessing: Resize(input_size) + CenterCrop(input_size), bilinear,
    full-size decode, ImageNet-like normalisation."""
    return {"name": name, "version": "2026.1", "input_size": SIZE, "channels": 3, "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25], "output_dim": dim, "resize_mode": "shorter", "interpolation": "bilinear",
            "draft": False} | over


def export(path, model: nn.Module, model_card: dict) -> None:
    """What the team does: torch.export with a dynamic batch dim, saved as .pt2, and a card beside it."""
    program = torch.export.export(model.eval(), (torch.zeros(2, model_card["channels"], model.size, model.size),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    (path.parent / f"{path.name}.card.yaml").write_text(yaml.safe_dump(model_card))


def embed(model: nn.Module, images: list[bytes], mean: float = 0.5, std: float = 0.25) -> np.ndarray:
    """The team's own pipeline in plain torch: PIL decode, torchvision's Resize(size) + CenterCrop(size) on
    these square images (a bilinear resize; tests/test_preprocess.py holds fct to torchvision itself),
    ToTensor, Normalize, the model. What fct's extraction must equal."""
    s = model.size
    x = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB").resize((s, s), Image.Resampling.BILINEAR))
                  for b in images]).transpose(0, 3, 1, 2)
    with torch.no_grad():
        return model.eval()((torch.from_numpy(x).float() / 255 - mean) / std).numpy()


def spark_write(store, directory: str, table: pa.Table, files: int) -> None:
    """Write `table` as Spark does: part-<n>-<uuid>-c000.snappy.parquet files and a _SUCCESS marker."""
    job = uuid.uuid4()
    for k, part in enumerate(np.array_split(np.arange(table.num_rows), files)):
        with store.fs.open_output_stream(f"{directory}/part-{k:05d}-{job}-c000.snappy.parquet") as f:
            pq.write_table(table.take(part), f, compression="snappy")
    with store.fs.open_output_stream(f"{directory}/_SUCCESS") as f:
        f.write(b"")


def doubles(x: np.ndarray) -> pa.Array:
    """Spark's ArrayType(DoubleType): list<double>."""
    return pa.array(list(x.astype(np.float64)), pa.list_(pa.float64()))


@pytest.fixture
def team(tmp_path, s3_endpoint, ray_local):
    """The team's bucket: images (Parquet with a URL column, and a folder), exported models with cards,
    features and the stored lake; fct's storage root in the same bucket."""
    bucket = f"team-{uuid.uuid4().hex[:8]}"
    cfg = make_cfg(f"s3://{bucket}/fct", endpoint=s3_endpoint)
    store = open_store(cfg.storage)
    dims = {"old": 8, "side": 6, "new": 12}
    models = {"old": MLP(8, 0, size=SIZES["old"]), "side": MLP(6, 1, size=SIZES["side"]), "new": TinyViT(size=SIZES["new"])}
    for name, m in models.items():
        export(tmp_path / f"{name}.pt2", m, card(f"team-{name}", dims[name], input_size=SIZES[name]))
    for suffix in ("", ".card.yaml"):  # the old model's file and card live on S3, the others on local disk
        store.write_bytes(f"{bucket}/team/models/old.pt2{suffix}", (tmp_path / f"old.pt2{suffix}").read_bytes())
    data = {}
    for split, per_class in (("train", 30), ("test", 12)):
        labels = np.repeat(np.arange(6), per_class).astype(np.int32)
        images = [image_lake.encode_png(im) for im in synthetic.generate(labels, SIZE, 3, seed=len(split))]
        ids = np.arange(len(labels)) * 7 + (0 if split == "train" else 100_000)  # ids that are not row numbers
        data[split] = ids, images, labels
        vec = {r: embed(m, images) for r, m in models.items()}
        spark_write(store, f"{bucket}/team/features/{split}", pa.table({
            "item_id": ids, "emb_v1": doubles(vec["old"]), "side_v1": doubles(vec["side"]),
            "emb_v2": doubles(vec["new"]), "category": labels}), files=3)
        spark_write(store, f"{bucket}/team/images/{split}", pa.table({
            "item_id": ids, "jpeg": pa.array(images, pa.binary()), "category": labels,
            "url": [f"https://shop.example/{i}.png" for i in ids]}), files=2)
    ids, images, labels = data["test"]
    for i, b in zip(ids[:10], images[:10]):
        store.write_bytes(f"{bucket}/team/folder/{i:06d}.png", b)
    stored = pa.table({"item_id": ids, "emb_v1": doubles(embed(models["old"], images)),
                       "side_v1": doubles(embed(models["side"], images))})
    spark_write(store, f"{bucket}/team/stored", stored, files=3)
    sets = [f"storage.root=s3://{bucket}/fct", f"storage.s3_endpoint={s3_endpoint}", "train.num_workers=1", "train.transformation.epochs=4",
            *(f"columns.{k}={v}" for k, v in COLUMNS.items())]
    return {"cfg": make_cfg(f"s3://{bucket}/fct", *sets[2:], endpoint=s3_endpoint), "store": store, "uri": f"s3://{bucket}/team",
            "local": tmp_path, "models": models, "data": data, "stored": stored,
            # fct COMMAND ...: the team's settings first, so that a test's own --set wins
            "fct": lambda cmd, *args: cli.main([cmd, "--preset", "tiny", *(x for s in sets for x in ("--set", s)), *args])}


def test_your_models_your_lake_the_readme_walk_end_to_end(team, capsys):
    """The README's "Your models, your lake": models exported torchvision-style at three input sizes,
    one extract of all three per split (label and URL carried), h trained on that lake, the evaluation on it,
    the backfill of the Spark-written stored lake, its index, a search; vectors checked at each step."""
    fct, uri, store, cfg = team["fct"], team["uri"], team["store"], team["cfg"]
    # bring your own models: torch.export program + card, hash-verified, checked against the card on import
    assert fct("import-model", "--name", "old", "--file", f"{uri}/models/old.pt2") == 0
    for name in ("side", "new"):
        assert fct("import-model", "--name", name, "--file", str(team["local"] / f"{name}.pt2")) == 0
    meta = registry.read_meta(store, "new")
    assert meta["kind"] == "exported" and meta["card"]["name"] == "team-new" and meta["dims"] == {"emb": 12}
    assert meta["preprocess"] | {"size": 24, "resize_mode": "shorter", "interpolation": "bilinear"} == meta["preprocess"]

    # one extract of the three models (16, 8 and 24 px) per split of the team's Spark-written image lake
    for split in ("train", "test"):
        assert fct("extract", "--model", "emb_v1=old", "--model", "side_v1=side", "--model", "emb_v2=new",
                   "--input", f"{uri}/images/{split}", "--output", f"{uri}/extracted/{split}", "--carry", "url") == 0
    ids, images, labels = team["data"]["test"]
    t = lake.read_lake(store, store.resolve(f"{uri}/extracted/test"), {"item_id": pa.int64()},
                       id_col="item_id").sort_by("item_id")
    np.testing.assert_array_equal(t["item_id"].to_numpy(), ids)
    for col, role in (("emb_v1", "old"), ("side_v1", "side"), ("emb_v2", "new")):
        np.testing.assert_allclose(lake.to_numpy(t[col]), embed(team["models"][role], images), atol=1e-5, err_msg=col)
    assert t["category"].to_pylist() == labels.tolist()
    assert t["url"].to_pylist() == [f"https://shop.example/{i}.png" for i in ids]
    assert fct("extract", "--model", "emb_v2=new", "--input", f"{uri}/folder", "--output", f"{uri}/from-folder") == 0
    f = lake.read_lake(store, store.resolve(f"{uri}/from-folder"), {"item_id": pa.int64()}, id_col="item_id").sort_by("item_id")
    np.testing.assert_array_equal(f["item_id"].to_numpy(), ids[:10])  # ids from the file names
    np.testing.assert_allclose(lake.to_numpy(f["emb_v2"]), lake.to_numpy(t["emb_v2"])[:10], atol=1e-6)

    # h from the extracted lake, its evaluation there, the backfill of the stored lake, an index, a search
    # on Ray Train: h on one worker with both training workers' CPUs (train.transformation.num_workers)
    assert fct("train-transformation", "--features", f"{uri}/extracted", "--set", "train.num_workers=2") == 0
    h_meta = registry.read_meta(store, "fct")
    assert h_meta["dims"] == {"old": 8, "side": 6, "new": 12} and h_meta["uses_side_info"]
    assert {(e["workers"], e["threads"]) for e in h_meta["metrics"]["history"]} == {(1, 2)}
    assert fct("evaluate", "--features", f"{uri}/extracted") == 0
    result = evaluation.features_matrix(cfg, store, f"{uri}/extracted")
    assert [(c["query"], c["gallery"]) for c in result["cases"]] == [("old", "old"), ("new", "new"), ("new", "fct"),
                                                                     ("new", "old")]
    assert result["skipped"] == {"new / FCT (no side-info)": "there is no transformation models/fct-noside; train it on "
                                 f"this lake: fct train-transformation --features {uri}/extracted --no-side"}
    # new / FCT is new queries ranked against h(old, side) of the same items, each query's own item left out
    h, _ = registry.load(store, "fct")
    vec = {c: torch.from_numpy(lake.to_numpy(t[c]).copy()) for c in ("emb_v1", "side_v1", "emb_v2")}
    with torch.no_grad():
        g = h(vec["emb_v1"], vec["side_v1"]).numpy()
    q = vec["emb_v2"].numpy()
    dist = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    new_fct = next(c for c in result["cases"] if (c["query"], c["gallery"]) == ("new", "fct"))
    assert new_fct["top1"] == pytest.approx(float((labels[dist.argmin(1)] == labels).mean()))
    exact = ranking.exact_ranking(q, labels, ids, g, labels, ids, cfg.eval.max_rank, 64)
    assert new_fct["cmc"] == pytest.approx(exact["cmc"]) and new_fct["map"] == pytest.approx(exact["map"])

    assert fct("backfill", "--input", f"{uri}/stored", "--output", f"{uri}/upgraded") == 0
    out = lake.read_lake(store, store.resolve(f"{uri}/upgraded"), {"item_id": pa.int64()}, id_col="item_id").sort_by("item_id")
    stored = team["stored"].sort_by("item_id")
    with torch.no_grad():
        want = h(*(torch.tensor(np.stack(stored[c].to_pylist()), dtype=torch.float32) for c in ("emb_v1", "side_v1")))
    np.testing.assert_array_equal(out["item_id"].to_numpy(), stored["item_id"].to_numpy())
    np.testing.assert_allclose(lake.to_numpy(out["emb_v2"]), want.numpy(), atol=1e-5)
    np.testing.assert_allclose(lake.to_numpy(out["emb_v2"]), g, atol=1e-5)  # the stored lake = what extract made
    assert fct("index", "--input", f"{uri}/upgraded", "--column", "emb_v2") == 0
    assert currency.manifest(store, store.resolve(f"{uri}/upgraded.index"))["rows"] == len(ids)
    queries = team["local"] / "queries.npy"
    np.save(queries, lake.to_numpy(out["emb_v2"])[:3])
    capsys.readouterr()
    assert fct("search", "--index", f"{uri}/upgraded.index", "--vectors", str(queries), "--k", "1") == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[1].split("(")[0] for line in printed] == [str(i) for i in ids[:3]]  # each finds its own id


def test_your_lake_as_iceberg_tables_the_readme_walk(team, tmp_path, capsys, caplog):
    """The README's "Your lake is an Iceberg table": the team's images and stored lake as tables (written by plain
    pyiceberg, warehouse on S3, catalog on a local sqlite file); extract into tables, h from the table pair, its
    evaluation, the backfill into a table, its index and a search, with vectors checked against the team's own."""
    fct, uri, store = team["fct"], team["uri"], team["store"]
    catalog = ["--set", f"tables.properties.uri=sqlite:///{tmp_path}/catalog.db",  # in this process: Ray's pool is
               "--set", "extract.distributor=local", "--set", "backfill.distributor=local"]  # the other walk's
    cat = load_catalog("fct", uri=f"sqlite:///{tmp_path}/catalog.db", warehouse=f"{uri}/warehouse",
                       **{"s3.endpoint": team["cfg"].storage.s3_endpoint})
    cat.create_namespace("team")
    for split in ("train", "test"):
        t = lake.read_lake(store, store.resolve(f"{uri}/images/{split}"), {"item_id": pa.int64()}, id_col="item_id")
        cat.create_table(f"team.images_{split}", schema=t.schema).append(t)
    cat.create_table("team.stored", schema=team["stored"].schema).append(team["stored"])
    for name in ("old", "side", "new"):
        assert fct("import-model", "--name", name, "--file", str(team["local"] / f"{name}.pt2")) == 0
    for split in ("train", "test"):
        assert fct("extract", "--model", "emb_v1=old", "--model", "side_v1=side", "--model", "emb_v2=new", *catalog,
                   "--input", f"iceberg://team.images_{split}", "--output", f"iceberg://team.features_{split}") == 0
        a = cat.load_table(f"team.features_{split}").scan().to_arrow().sort_by("item_id")
        ids, images, labels = team["data"][split]
        np.testing.assert_array_equal(a["item_id"].to_numpy(), ids)
        assert a["category"].to_pylist() == labels.tolist()
        for c, role in (("emb_v1", "old"), ("side_v1", "side"), ("emb_v2", "new")):  # read back as list<float>
            np.testing.assert_allclose(np.stack(a[c].to_numpy(zero_copy_only=False)), embed(team["models"][role], images),
                                       atol=1e-5, err_msg=c)
    assert fct("train-transformation", "--features", "iceberg://team.features", *catalog, *IN_DRIVER) == 0
    caplog.clear()
    assert fct("evaluate", "--features", "iceberg://team.features", *catalog) == 0
    assert "| new / FCT (with side-info) |" in caplog.text and "skipped new / FCT (with side-info)" not in caplog.text
    assert fct("backfill", "--input", "iceberg://team.stored", "--output", "iceberg://team.gallery_v2", *catalog) == 0
    out = cat.load_table("team.gallery_v2").scan().to_arrow().sort_by("item_id")
    h, _ = registry.load(store, "fct")
    stored = team["stored"].sort_by("item_id")
    with torch.no_grad():
        want = h(*(torch.tensor(np.stack(stored[c].to_pylist()), dtype=torch.float32) for c in ("emb_v1", "side_v1")))
    np.testing.assert_array_equal(out["item_id"].to_numpy(), stored["item_id"].to_numpy())
    np.testing.assert_allclose(np.stack(out["emb_v2"].to_numpy(zero_copy_only=False)), want.numpy(), atol=1e-5)
    assert fct("index", "--input", "iceberg://team.gallery_v2", "--column", "emb_v2", "--output", f"{uri}/gallery.index",
               *catalog) == 0
    queries = team["local"] / "queries.npy"
    np.save(queries, want.numpy()[:3])
    capsys.readouterr()
    assert fct("search", "--index", f"{uri}/gallery.index", "--vectors", str(queries), "--k", "1") == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[1].split("(")[0] for line in printed] == [str(i) for i in stored["item_id"].to_pylist()[:3]]


def test_evaluate_without_labels_fails_with_the_fix_and_names_a_case_it_cannot_compute(team, caplog):
    """A features lake without its label column is a non-zero exit naming the fix; an h trained on other
    model versions is a named skip, not a shorter table."""
    fct, uri, store = team["fct"], team["uri"], team["store"]
    for split in ("train", "test"):
        t = lake.read_lake(store, store.resolve(f"{uri}/features/{split}"), {"item_id": pa.int64()}, id_col="item_id")
        spark_write(store, store.resolve(f"{uri}/unlabelled/{split}"), t.drop_columns(["category"]), files=1)
    assert fct("evaluate", "--features", f"{uri}/unlabelled") == 2
    assert "no label column 'category', and the evaluation needs each item's class: name the lake's label column " \
           "(--set columns.label=COLUMN)" in caplog.text
    assert fct("train-transformation", "--features", f"{uri}/features", *IN_DRIVER) == 0
    caplog.clear()
    assert fct("evaluate", "--features", f"{uri}/features") == 0  # h's own lake: the FCT case is computed
    assert "skipped new / FCT (with side-info)" not in caplog.text
    for name in ("old", "side", "new"):  # the same vectors, extracted: the lake now says which versions made them
        assert fct("import-model", "--name", name, "--file", str(team["local"] / f"{name}.pt2")) == 0
    for split in ("train", "test"):
        assert fct("extract", "--model", "emb_v1=old", "--model", "side_v1=side", "--model", "emb_v2=new",
                   "--input", f"{uri}/images/{split}", "--output", f"{uri}/extracted/{split}") == 0
    caplog.clear()
    assert fct("evaluate", "--features", f"{uri}/extracted") == 0
    assert (f"skipped new / FCT (with side-info): because models/fct was trained on {uri}/features/train, and which "
            "model versions made its columns or this lake's is not recorded; train it on this lake: fct "
            f"train-transformation --features {uri}/extracted") in caplog.text
    assert "| new / old |" in caplog.text and "| new / FCT (with side-info) |" not in caplog.text


def test_a_lake_without_side_info_gets_the_no_side_transformation(team):
    fct, uri, store = team["fct"], team["uri"], team["store"]
    for split in ("train", "test"):  # the features without their side_v1 column, as one file per split
        t = lake.read_lake(store, store.resolve(f"{uri}/features/{split}"), {"item_id": pa.int64()}, id_col="item_id")
        spark_write(store, store.resolve(f"{uri}/noside/{split}"), t.drop_columns(["side_v1"]), files=1)
    assert fct("train-transformation", "--features", f"{uri}/noside", *IN_DRIVER) == 0
    assert not registry.exists(store, "fct") and not registry.read_meta(store, "fct-noside")["uses_side_info"]
    spark_write(store, store.resolve(f"{uri}/stored-noside"), team["stored"].drop_columns(["side_v1"]), files=2)
    assert fct("backfill", "--model", "fct-noside", "--input", f"{uri}/stored-noside", "--output", f"{uri}/up") == 0
    out = lake.read_lake(store, store.resolve(f"{uri}/up"), {"item_id": pa.int64()}, id_col="item_id").sort_by("item_id")
    h, _ = registry.load(store, "fct-noside")
    old = torch.tensor(np.stack(team["stored"].sort_by("item_id")["emb_v1"].to_pylist()), dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(lake.to_numpy(out["emb_v2"]), h(old).numpy(), atol=1e-5)


def test_a_wrong_card_a_wrong_dim_and_a_ragged_vector_each_give_their_clear_error(team, caplog):
    fct, uri, store, local = team["fct"], team["uri"], team["store"], team["local"]
    export(local / "bad-dim.pt2", team["models"]["old"], card("team-old", 9))  # the model gives 8
    assert fct("import-model", "--name", "old", "--file", str(local / "bad-dim.pt2")) == 2
    assert "bad-dim.pt2: outputs shape (8,) per image; its card says output_dim 9" in caplog.text
    export(local / "bad-input.pt2", team["models"]["old"], card("team-old", 8, input_size=20))  # the MLP takes 16x16
    assert fct("import-model", "--name", "old", "--file", str(local / "bad-input.pt2")) == 2
    assert "bad-input.pt2: takes input of shape Nx3x16x16; its card describes images of shape Nx3x20x20" in caplog.text
    (local / "typo.pt2.card.yaml").write_text(yaml.safe_dump(card("team-old", 8, mean_=[0.5])))
    (local / "typo.pt2").write_bytes((local / "old.pt2").read_bytes())
    assert fct("import-model", "--name", "old", "--file", str(local / "typo.pt2")) == 2
    assert "typo.pt2.card.yaml: unknown key mean_" in caplog.text
    pickled = local / "pickled.pt2"  # an archive that would make torch.export.load unpickle a weight
    with zipfile.ZipFile(local / "old.pt2") as src, zipfile.ZipFile(pickled, "w") as dst:
        for n in src.namelist():
            data = src.read(n)
            if n.endswith("_weights_config.json"):
                config = json.loads(data)
                next(iter(config["config"].values()))["use_pickle"] = True
                data = json.dumps(config).encode()
            dst.writestr(n, data)
    (local / "pickled.pt2.card.yaml").write_text((local / "old.pt2.card.yaml").read_text())
    assert fct("import-model", "--name", "old", "--file", str(pickled)) == 2
    assert "pickled.pt2: net.1.weight is stored as a pickled object; refused" in caplog.text
    assert not registry.exists(store, "old")  # nothing was registered by the failed imports

    # a stored row of the wrong length: the backfill names file and id, and commits nothing
    assert fct("import-model", "--name", "old", "--file", str(local / "old.pt2")) == 0
    assert fct("train-transformation", "--features", f"{uri}/features", *IN_DRIVER) == 0
    bad = team["stored"].to_pylist()
    bad[5]["emb_v1"] = bad[5]["emb_v1"][:-1]
    spark_write(store, store.resolve(f"{uri}/ragged"), pa.Table.from_pylist(bad, team["stored"].schema), files=1)
    caplog.clear()
    assert fct("backfill", "--input", f"{uri}/ragged", "--output", f"{uri}/ragged-out") == 2
    assert (f"id {bad[5]['item_id']}: vector of length 7 in column 'emb_v1'; expected 8") in caplog.text
    assert "part-00000-" in caplog.text and not currency.has_manifest(store, store.resolve(f"{uri}/ragged-out"))
    assert fct("backfill", "--input", f"{uri}/ragged", "--output", f"{uri}/ragged-out",
               "--set", "backfill.on_bad_input=quarantine") == 0
    assert currency.manifest(store, store.resolve(f"{uri}/ragged-out"))["rows"] == len(bad) - 1
    rejected = lake.read_lake(store, store.resolve(f"{uri}/ragged-out.rejected"), {"item_id": pa.int64()}, id_col="item_id")
    assert rejected["item_id"].to_pylist() == [bad[5]["item_id"]]
    assert rejected["reason"].to_pylist() == ["vector of length 7 in column 'emb_v1'; expected 8"]


def test_bct_with_an_old_model_without_classifier_uses_its_class_means(tmp_path, ray_local):
    root = str(tmp_path / "root")
    cfg = make_cfg(root, "train.num_workers=0")
    store = open_store(cfg.storage)
    datasets.fill(cfg, store)  # the tiny preset's grey 16x16 images
    old = MLP(8, 0, channels=1)
    export(tmp_path / "old.pt2", old, card("team-old", 8, channels=1, mean=[0.5], std=[0.25]))
    run = ["--preset", "tiny", "--set", f"storage.root={root}", "--set", "train.num_workers=0"]
    assert cli.main(["import-model", *run, "--name", "old", "--file", str(tmp_path / "old.pt2")]) == 0
    with pytest.raises(lake.LakeError, match=r"needs the old model's embeddings of the train split.*fct extract"):
        stages.old_classifier(cfg, store)  # no extract as a side effect: the caller runs it
    assert cli.main(["extract", *run, "--model", "emb=old", "--split", "train"]) == 0  # the command the error names
    classes, weight, meta = stages.old_classifier(cfg, store)
    _, x, y = image_lake.read_images(store, "train")
    with torch.no_grad():
        e = old.eval()((torch.from_numpy(x).float() / 255 - 0.5) / 0.25).numpy()
    assert classes == sorted(set(y.tolist()))
    np.testing.assert_allclose(weight.numpy(), [e[y == c].mean(0) for c in classes], atol=1e-5)
    assert cli.main(["train-new", "--bct", *run]) == 0
    bct = registry.read_meta(store, "bct")
    assert bct["dims"]["emb"] == 8 and bct["compatible_with"] == {"old": meta["version"]}


def test_a_folder_of_images_is_packed_by_id_and_refuses_names_that_are_not_ids(tmp_path):
    store = open_store(make_cfg(str(tmp_path / "root")).storage)
    png = image_lake.encode_png(np.zeros((4, 4), np.uint8))
    images = tmp_path / "images"
    images.mkdir()
    for name in ("000012.png", "7.png", "notes.txt"):
        (images / name).write_bytes(png)
    m = folder.pack(store, str(images), str(tmp_path / "packed"), 10, "item_id", "jpeg")
    t = lake.read_lake(store, str(tmp_path / "packed"), {"item_id": pa.int64(), "jpeg": pa.binary()}, id_col="item_id")
    assert m["rows"] == 2 and sorted(t["item_id"].to_pylist()) == [7, 12]
    (images / "0007.jpg").write_bytes(png)
    with pytest.raises(lake.LakeError, match=r"id 7 is named by more than one file: .*0007.jpg, .*7.png"):
        folder.pack(store, str(images), str(tmp_path / "packed"), 10)
    (images / "0007.jpg").unlink()
    (images / "cat.png").write_bytes(png)
    with pytest.raises(lake.LakeError, match=r"cat.png: the file name is not an id"):
        folder.pack(store, str(images), str(tmp_path / "packed"), 10)
