"""Models a team brings: a `torch.export` program (.pt2) and its model card, registered as an artefact.

Format: torch.export's `.pt2` (`torch.export.save(torch.export.export(model, (x,), dynamic_shapes=
({0: Dim("batch")},)), path)`). It loads without the user's Python code, records the input shape
the card is checked against, and is what PyTorch maintains (torch 2.13 deprecates TorchScript's
`torch.jit.load`). Its loader may unpickle (`torch.export.load`: "never load data from an untrusted
source"): only for payloads the archive marks as pickled, custom/opaque objects, or sample inputs
that `weights_only` cannot read. `check_archive` refuses every such archive first, so a model file
cannot run code in our workers; plain exported models have none. Like our own artefacts, the file
is hash-verified (models/{name}/meta.json) before it is loaded.

The card (YAML, next to the file as FILE.card.yaml or named with --card) says how to feed the model:

    name: acme-resnet50       # the model's name and version, as its team calls them
    version: "2024.1"
    input_size: 224           # side of the square input (pixels)
    channels: 3               # 3 (RGB) or 1 (grey)
    resize: 256               # the image is scaled to this (default: input_size), then centre-cropped to input_size
    resize_mode: shorter      # fit (default): the centre square scaled to resize x resize (PIL ImageOps.fit);
                              # shorter: shorter side to resize, aspect kept (torchvision Resize(resize));
                              # stretch: whole image to resize x resize (torchvision Resize((resize, resize)))
    interpolation: bilinear   # bicubic (default) | bilinear (torchvision's default) | nearest | lanczos
    crop: center              # center (default): the centre input_size square; none: resize must equal input_size
    draft: false              # true (default): JPEGs may decode at a reduced scale still >= resize (faster);
                              # false: full-size decode, as torchvision pipelines do
    mean: [0.485, 0.456, 0.406]  # per-channel normalisation of pixels in [0, 1]
    std: [0.229, 0.224, 0.225]
    output_dim: 2048          # embedding dim
    sha256: null              # optional: the file's SHA-256, checked on import
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlparse

import torch
import torch.nn as nn
import yaml

from ..config import ConfigError, from_dict
from ..image_lake import CROPS, FILTERS, RESIZE_MODES, Preprocess
from ..storage import Store, StorageError
from .artefact import ArtefactError, save_bytes

KIND = "exported"
FILE = "model.pt2"


def plain_prefixes() -> tuple[str, str]:
    """The names of the payloads that are raw tensor bytes. Imported here, not at the top: torch.export's
    archive module pulls in torch._dynamo (~1.8 s here), which every process importing the registry (each
    engine actor, each CLI run) would otherwise pay, exported models or not."""
    from torch.export.pt2_archive.constants import TENSOR_CONSTANT_FILENAME_PREFIX, WEIGHT_FILENAME_PREFIX
    return WEIGHT_FILENAME_PREFIX, TENSOR_CONSTANT_FILENAME_PREFIX


@dataclass
class ModelCard:
    name: str = ""
    version: str = ""
    input_size: int = 0
    channels: int = 3
    resize: Optional[int] = None
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    output_dim: int = 0
    sha256: Optional[str] = None
    resize_mode: str = "fit"
    interpolation: str = "bicubic"
    crop: str = "center"
    draft: bool = True

    def preprocess(self) -> dict:
        """How images are fitted for this model (image_lake.Preprocess's fields)."""
        return dataclasses.asdict(Preprocess(self.input_size, self.resize or self.input_size, self.channels,
                                             self.resize_mode, self.interpolation, self.crop, self.draft))


def read_card(text: str, where: str) -> ModelCard:
    """Parse and check a model card; errors name the card and the key."""
    try:
        card = from_dict(ModelCard, yaml.safe_load(text) or {}, where)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not YAML ({e})") from None
    problems = [f"{k} is missing" for k in ("name", "version") if not getattr(card, k)]
    problems += [f"{k} must be > 0" for k in ("input_size", "output_dim") if getattr(card, k) <= 0]
    if card.channels not in (1, 3):
        problems.append(f"channels is {card.channels}; expected 1 or 3")
    for k in ("mean", "std"):
        if len(getattr(card, k)) not in (1, card.channels):
            problems.append(f"{k} has {len(getattr(card, k))} values; expected 1 or channels ({card.channels})")
    if card.resize is not None and card.resize < card.input_size:
        problems.append(f"resize {card.resize} is smaller than input_size {card.input_size}")
    for k, allowed in (("resize_mode", RESIZE_MODES), ("interpolation", tuple(FILTERS)), ("crop", CROPS)):
        if getattr(card, k) not in allowed:
            problems.append(f"{k} is {getattr(card, k)!r}; expected one of {', '.join(allowed)}")
    if card.crop == "none" and (card.resize_mode == "shorter" or (card.resize or card.input_size) != card.input_size):
        problems.append("crop none needs a square input_size x input_size image after resizing (resize_mode fit or "
                        "stretch, resize unset or equal to input_size)")
    if problems:
        raise ConfigError(f"model card {where}: " + "; ".join(problems))
    return card


class Exported(nn.Module):
    """uint8 images (B, C, S, S) -> pixels in [0, 1], normalised by the card -> the team's program
    -> (B, output_dim)."""

    def __init__(self, program: nn.Module, card: ModelCard):
        super().__init__()
        self.program = program
        self.register_buffer("mean", torch.tensor(card.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(card.std, dtype=torch.float32).view(1, -1, 1, 1))

    def train(self, mode: bool = True) -> "Exported":
        """The program keeps the mode it was exported in (eval); torch.export modules refuse train()."""
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program((x.to(self.mean.dtype) / 255 - self.mean) / self.std)


def check_archive(data: bytes, where: str) -> None:
    """Refuse a .pt2 whose loading would unpickle anything (see the module docstring)."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ArtefactError(f"{where}: not a .pt2 archive; export the model with torch.export.save") from None
    names = z.namelist()
    if not any(n.endswith(".json") and "/models/" in n for n in names):
        raise ArtefactError(f"{where}: no exported program in the archive; export the model with "
                                     "torch.export.save")
    plain = plain_prefixes()
    for n in names:
        if n.endswith(("_weights_config.json", "_constants_config.json")):
            for fqn, entry in json.loads(z.read(n)).get("config", {}).items():
                if entry.get("use_pickle") or not entry.get("path_name", "").startswith(plain):
                    raise ArtefactError(f"{where}: {fqn} is stored as a pickled object; refused (a model "
                                                 "file must hold plain tensors)")
        elif "/data/sample_inputs/" in n:
            try:
                torch.load(io.BytesIO(z.read(n)), weights_only=True)
            except Exception:  # noqa: BLE001 - anything weights_only cannot read is refused
                raise ArtefactError(f"{where}: its sample inputs are not plain tensors; refused") from None


def input_shape(program: torch.export.ExportedProgram) -> tuple:
    """The exported input's shape, a symbolic (dynamic) dim as None."""
    user = set(program.graph_signature.user_inputs)
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name in user)
    return tuple(d if isinstance(d, int) else None for d in node.meta["val"].shape)


def module(data: bytes, card: ModelCard, where: str) -> Exported:
    """Load the .pt2 and check it against the card: its recorded input shape, then a batch of two blank
    images; a model that does not take the card's input or does not give its output_dim fails here,
    before any work, with both named."""
    check_archive(data, where)
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - the deserializer raises many types for a bad archive
        raise ArtefactError(f"{where}: not a loadable exported program ({type(e).__name__}: {e})") from None
    want = (card.channels, card.input_size, card.input_size)
    got = input_shape(program)
    if len(got) != 4 or any(g is not None and g != w for g, w in zip(got[1:], want)):
        shown = "x".join("N" if g is None else str(g) for g in got)
        raise ArtefactError(f"{where}: takes input of shape {shown}; its card describes images of shape "
                                     f"Nx{want[0]}x{want[1]}x{want[2]} (channels, input_size)")
    if got[0] is not None:
        raise ArtefactError(f"{where}: exported for batches of exactly {got[0]}; export it with a dynamic "
                                     "batch dim (dynamic_shapes=({0: torch.export.Dim('batch')},))")
    wrapped = Exported(program.module(), card)
    with torch.no_grad():
        out = wrapped(torch.zeros((2, *want), dtype=torch.uint8))
    if tuple(out.shape) != (2, card.output_dim):
        raise ArtefactError(f"{where}: outputs shape {tuple(out.shape[1:])} per image; its card says "
                                     f"output_dim {card.output_dim}")
    return wrapped


def read_user_file(store: Store, location: str) -> bytes:
    """A file the user names: on the store's storage (URI or path), or else on this machine's disk."""
    try:
        return store.read_bytes(store.resolve(location))
    except StorageError:
        path = urlparse(location).path if location.startswith("file://") else location
        if not os.path.isfile(os.path.expanduser(path)):
            raise FileNotFoundError(f"{location}: no such file (on storage.root's storage or this machine)") from None
        with open(os.path.expanduser(path), "rb") as f:
            return f.read()


def import_model(store: Store, name: str, file: str, card_file: str | None = None) -> dict:
    """Register the exported program `file` (.pt2) with its card as models/{name}; returns its meta."""
    card_file = card_file or f"{file}.card.yaml"
    card = read_card(read_user_file(store, card_file).decode(), card_file)
    data = read_user_file(store, file)
    sha = hashlib.sha256(data).hexdigest()
    if card.sha256 and card.sha256.lower() != sha:
        raise ArtefactError(f"{file}: SHA-256 {sha} does not match its card's sha256 {card.sha256}")
    module(data, card, file)
    meta = {"kind": KIND, "file": FILE, "card": dataclasses.asdict(card), "dims": {"emb": card.output_dim},
            "preprocess": card.preprocess(), "source": file, "has_classifier": False}
    return save_bytes(store, name, data, meta, key=sha)
