"""The one config: typed dataclasses loaded from YAML, with `--set a.b=c` overrides.

Every key is checked before any work starts: unknown keys, wrong types and out-of-range values raise
ConfigError naming the key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

PRESETS = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A config key, type or value that is not allowed."""


def num(default: Any, lo: float | None = None, hi: float | None = None) -> Any:
    """A numeric field with an inclusive allowed range."""
    return field(default=default, metadata={"min": lo, "max": hi})


def sub(cls: type) -> Any:
    return field(default_factory=cls)


@dataclass
class Storage:
    root: str = "./fct-data"
    s3_endpoint: Optional[str] = None
    s3_region: str = "us-east-1"
    s3_max_attempts: int = num(8, 1, 100)
    s3_request_timeout: Optional[float] = num(None, 0.01)
    s3_connect_timeout: Optional[float] = num(None, 0.01)
    s3_create_bucket: bool = False


@dataclass
class Synthetic:
    num_classes: int = num(20, 2, 100_000)
    train_per_class: int = num(200, 1)
    test_per_class: int = num(50, 1)
    image_size: int = num(28, 8, 1024)
    channels: int = num(1, 1, 3)
    seed: int = 0


@dataclass
class Data:
    source: Literal["demo", "synthetic", "folder"] = "demo"
    folder: Optional[str] = None
    cache_dir: str = "~/.cache/fct-dist"
    num_old_classes: int = num(10, 1)
    old_classes_seed: int = 0
    rows_per_file: int = num(10_000, 1)
    test_fraction: float = num(0.2, 0.01, 0.9)
    synthetic: Synthetic = sub(Synthetic)


@dataclass
class Backbone:
    width: int = num(16, 1, 1024)
    blocks: list[int] = field(default_factory=lambda: [1, 1, 1])
    emb_dim: int = num(128, 2, 8192)


@dataclass
class SideInfo(Backbone):
    proj_dim: int = num(64, 2, 8192)


@dataclass
class Transformation:
    hidden: int = num(512, 8, 65536)
    branch: int = num(256, 8, 65536)
    uncertainty: bool = True


@dataclass
class Models:
    old: Backbone = field(default_factory=lambda: Backbone(width=8, blocks=[1, 1], emb_dim=32))
    side: SideInfo = field(default_factory=lambda: SideInfo(width=8, blocks=[1, 1], emb_dim=64))
    new: Backbone = field(default_factory=lambda: Backbone(width=16, blocks=[1, 1, 1], emb_dim=128))
    transformation: Transformation = sub(Transformation)


@dataclass
class Optim:
    epochs: int = num(3, 1, 10_000)
    batch_size: int = num(256, 1, 1 << 20)
    lr: float = num(0.1, 0.0, 100.0)
    weight_decay: float = num(5e-4, 0.0, 1.0)
    warmup_epochs: float = num(0.5, 0.0, 10_000)
    seed: int = 0


@dataclass
class ImageTrain(Optim):
    """SGD over images from the image lake."""
    momentum: float = num(0.9, 0.0, 1.0)
    augment: bool = True
    max_train_images: Optional[int] = num(None, 1)


@dataclass
class ClassifierTrain(ImageTrain):
    label_smoothing: float = num(0.1, 0.0, 1.0)


@dataclass
class SideTrain(ImageTrain):
    temperature: float = num(0.2, 1e-3, 10.0)


@dataclass
class BctTrain(ClassifierTrain):
    influence_weight: float = num(1.0, 0.0, 100.0)


@dataclass
class TransformationTrain(Optim):
    num_workers: Optional[int] = num(1, 1, 4096)
    views: int = num(0, 0, 64)
    freeze_bn_fraction: float = num(0.5, 0.0, 1.0)
    classification_weight: float = num(0.03, 0.0, 100.0)
    label_smoothing: float = num(0.1, 0.0, 1.0)
    mu_uncertainty: float = num(0.5, 0.0, 100.0)


@dataclass
class Train:
    num_workers: int = num(2, 0, 4096)
    use_gpu: Literal["auto", "true", "false"] = "auto"
    cpus_per_worker: float = num(1.0, 0.0, 1024)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = num(2, -1, 1000)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    old: ClassifierTrain = field(default_factory=lambda: ClassifierTrain(epochs=2))
    side: SideTrain = field(default_factory=lambda: SideTrain(epochs=3, batch_size=256, lr=0.3))
    new: ClassifierTrain = field(default_factory=lambda: ClassifierTrain(epochs=2))
    bct: BctTrain = field(default_factory=lambda: BctTrain(epochs=2))
    transformation: TransformationTrain = field(
        default_factory=lambda: TransformationTrain(epochs=20, batch_size=512, lr=5e-4, weight_decay=2**-15,
                                                    warmup_epochs=2))


@dataclass
class Actors:
    """The per-file engine's workers: a pool of Ray actors (or this process), each holding the
    model(s) on its device."""
    distributor: Literal["ray", "local"] = "ray"
    num_actors: int = num(2, 1, 100_000)
    cpus_per_actor: float = num(0.5, 0.0, 1024)
    gpus_per_actor: float = num(1.0, 0.0, 64)
    files_in_flight: int = num(1, 1, 64)
    batch_size: int = num(4096, 1, 1 << 24)
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    on_bad_input: Literal["fail", "quarantine"] = "fail"
    max_attempts: int = num(3, 1, 100)
    lease_seconds: float = num(60.0, 1.0, 86_400)
    gc_grace_seconds: float = num(3600.0, 0.0, 10 * 86_400)


@dataclass
class Columns:
    """Column names in the lakes a stage is pointed at (a URI); fct's own lakes use the defaults."""
    id: str = "id"
    image: str = "image"
    label: str = "label"
    old: str = "old"
    side: str = "side"
    new: str = "new"
    out: str = "emb"
    uncertainty: str = "uncertainty"
    keep: list[str] = field(default_factory=list)  # input columns the backfill copies unchanged into its output
    carry: list[str] = field(default_factory=list)  # image-lake columns fct extract copies into its output (+ label)


@dataclass
class Index:
    factory: str = "auto"
    nprobe: int = num(16, 1, 65536)
    train_sample: int = num(200_000, 1)
    num_shards: int = num(2, 1, 100_000)
    use_gpu: Literal["auto", "true", "false"] = "auto"


@dataclass
class Eval:
    max_rank: int = num(20, 1, 10_000)
    block_size: int = num(256, 1, 1 << 20)
    exact_max_gallery: int = num(200_000, 1)
    search_k: int = num(1000, 1, 100_000)
    split: str = "test"
    curve_points: int = num(11, 2, 1001)
    curve_queries: Optional[int] = num(2000, 1)


@dataclass
class Refill:
    budget: float = num(0.1, 0.0, 1.0)


@dataclass
class Versions:
    classes: list[Optional[int]] = field(default_factory=lambda: [None], metadata={"min": 1})
    strategy: Literal["auto", "chained", "direct"] = "auto"

    def __post_init__(self):
        c = self.classes
        known = [k for k in c if k is not None]
        if not c or None in c[:-1] or known != sorted(set(known)):
            raise ConfigError(f"versions.classes: {c!r}; expected one entry per version after the old one, each "
                              "knowing more classes than the one before (null = all, last only), e.g. [15, null]")

    @property
    def last(self) -> int:
        """N of the chain old (v1) -> new (v2) -> ... -> vN."""
        return len(self.classes) + 1

    def classes_of(self, k: int) -> Optional[int]:
        """How many classes version k >= 2 is trained on (None = all)."""
        return self.classes[k - 2]


@dataclass
class Projection:
    items: int = num(1_000_000_000, 1)
    gpus: list[int] = field(default_factory=lambda: [8, 64, 512])
    storage_gbps: float = num(100.0, 0.001)
    gpu_backfill_rows_per_s: float = num(147_000.0, 1.0)
    gpu_extract_images_per_s: float = num(2_500.0, 1.0)


@dataclass
class Scale:
    rows: list[int] = field(default_factory=lambda: [1_000_000, 5_000_000, 25_000_000])
    rows_per_file: int = num(100_000, 1)
    clusters: int = num(1000, 1)
    latent_dim: int = num(24, 1, 4096)
    spread: float = num(0.3, 0.0)
    noise: float = num(0.05, 0.0)
    queries: int = num(1000, 1)
    k: int = num(10, 1, 10_000)
    nprobe: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    recall_goal: float = num(0.9, 0.0, 1.0)


@dataclass
class Bench:
    rows: int = num(1_000_000, 1)
    scale_rows: list[int] = field(default_factory=lambda: [1_000_000, 2_000_000, 4_000_000])
    rows_per_file: int = num(100_000, 1)
    demo_items: int = num(50_000, 1)
    production_items: int = num(512, 1)
    image_files: int = num(8, 1)
    image_size: int = num(224, 16, 4096)
    jpeg_height: int = num(375, 16, 8192)
    production_batch_size: int = num(32, 1, 1 << 16)
    io_repeats: int = num(3, 1, 100)
    actors_per_gpu: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    projection: Projection = sub(Projection)
    scale: Scale = sub(Scale)


@dataclass
class Tables:
    catalog: str = "fct"
    properties: dict = field(default_factory=dict)


@dataclass
class RayCfg:
    address: str = "local"
    num_cpus: Optional[float] = num(None, 1, 1 << 20)
    object_store_memory: Optional[int] = num(None, 78_643_200)


@dataclass
class Config:
    storage: Storage = sub(Storage)
    data: Data = sub(Data)
    models: Models = sub(Models)
    train: Train = sub(Train)
    extract: Actors = field(default_factory=lambda: Actors(batch_size=128))  # CPU-sized: see config.yaml
    backfill: Actors = field(default_factory=lambda: Actors(batch_size=8192))
    columns: Columns = sub(Columns)
    index: Index = sub(Index)
    eval: Eval = sub(Eval)
    refill: Refill = sub(Refill)
    versions: Versions = sub(Versions)
    bench: Bench = sub(Bench)
    tables: Tables = sub(Tables)
    ray: RayCfg = sub(RayCfg)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self, *sections: str) -> dict:
        """The named dotted sections: what a stage's artefact depends on (feed it to `digest`)."""
        d = self.to_dict()
        return {s: _get(d, s.split(".")) for s in sections}


def _get(d: dict, keys: list[str]) -> Any:
    for k in keys:
        d = d[k]
    return d


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any, meta: dict) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, tp, meta)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; expected {_type_name(tp)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: {value!r} is not a list; expected a list of {_type_name(args[0])}")
        return [_coerce(f"{key}[{i}]", v, args[0], meta) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    ok = (isinstance(value, bool) if tp is bool
          else isinstance(value, int) and not isinstance(value, bool) if tp is int
          else isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float
          else isinstance(value, tp))
    if not ok:
        raise ConfigError(f"{key}: {value!r} has type {type(value).__name__}; expected {_type_name(tp)}")
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{key}: {value!r} is out of range; allowed {lo if lo is not None else '-inf'}"
                          f" .. {hi if hi is not None else 'inf'}")
    return float(value) if tp is float else value


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; allowed keys here: {', '.join(fields)}")
    default = cls()
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            kwargs[name] = getattr(default, name)
        elif dataclasses.is_dataclass(hints[name]):
            if not isinstance(data[name], (dict, type(None))):
                raise ConfigError(f"{key}: expected a section (mapping), got {data[name]!r}")
            merged = dataclasses.asdict(getattr(default, name)) | (data[name] or {})
            kwargs[name] = _build(hints[name], merged, key)
        else:
            kwargs[name] = _coerce(key, data[name], hints[name], dict(f.metadata))
    return cls(**kwargs)


def from_dict(cls: type, data: Any, where: str) -> Any:
    """A typed dataclass from a mapping read from `where`, with the config's checks (unknown keys, types)."""
    try:
        return _build(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        nxt = tree.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
        tree = nxt
    tree[keys[-1]] = value


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def load(path: str | Path | None = None, overrides: list[str] = (), preset: str | None = None,
         base: "Config | None" = None) -> Config:
    """Load `path` (or `base`, or the embedded defaults), then a preset overlay, then `key=value` overrides."""
    tree = read_yaml(path) if path else dataclasses.asdict(base) if base else {}
    if preset:
        file = PRESETS / f"{preset}.yaml"
        if not file.exists():
            allowed = sorted(p.stem for p in PRESETS.glob("*.yaml"))
            raise ConfigError(f"unknown preset {preset!r}; allowed: {', '.join(allowed)}")
        tree = _merge(tree, read_yaml(file))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.num_workers=2")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw))
    cfg = _build(Config, tree)
    for name in ("extract", "backfill"):
        a = getattr(cfg, name)
        if a.gc_grace_seconds <= a.lease_seconds:  # a file younger than the lease may belong to a live run
            raise ConfigError(f"{name}.gc_grace_seconds={a.gc_grace_seconds:g} must be longer than "
                              f"{name}.lease_seconds={a.lease_seconds:g}")
    return cfg
