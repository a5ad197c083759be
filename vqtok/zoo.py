"""The shipped tokenizers: models/NAME/{model.safetensors, card.json, README.md}, usable by name wherever a
command takes a model file (`vqtok encode mnist digits/ --out t`, `vqtok.load("mnist")`).

Where they are: a wheel (`pip install .`) carries the repository's models/ folder as package data, installed
as vqtok/models/ (pyproject.toml maps it); an editable install or a plain checkout finds models/ beside the
vqtok/ folder. card.json holds each model's figures (written by tools/build_models.py). Nothing here imports
torch, so `vqtok models` stays quick.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vqtok.errors import VqtokError

MODEL_FILE = "model.safetensors"
CARD_FILE = "card.json"

# Per modality: the token-file rates (bits per pixel, kilobits per second) and the quality figures that head
# a model's listing and its card, the first one the figure a card test checks.
UNITS = {"image": "bpp", "audio": "kbps"}
RATES = {"image": ("bpp_packed_file", "bpp_entropy_file"), "audio": ("kbps_packed_file", "kbps_entropy_file")}
QUALITY = {"image": ("psnr", "ssim"), "audio": ("si_snr", "pesq_wb", "stoi")}

# How a figure is shown in listings and cards: (name, unit, decimals).
FIGURES = {
    "bits_per_pixel": ("codes", "bpp", 3), "bpp_packed_file": ("packed file", "bpp", 3),
    "bpp_entropy_file": ("entropy file", "bpp", 3), "kbps": ("codes", "kbps", 2),
    "kbps_packed_file": ("packed file", "kbps", 2), "kbps_entropy_file": ("entropy file", "kbps", 2),
    "psnr": ("PSNR", "dB", 2), "ssim": ("SSIM", "", 3), "ms_ssim": ("MS-SSIM", "", 3),
    "si_snr": ("SI-SNR", "dB", 2), "pesq_wb": ("PESQ", "", 2), "stoi": ("STOI", "", 3),
    "mel_distance": ("mel distance", "", 3), "usage": ("usage", "", 3), "perplexity": ("perplexity", "", 1),
}


def heading(key: str) -> str:
    """A figure's column heading: "PSNR (dB)"."""
    name, unit, _ = FIGURES[key]
    return f"{name} ({unit})" if unit else name


def show(key: str, value: float) -> str:
    """A figure's value at its precision: "25.10"."""
    return f"{value:.{FIGURES[key][2]}f}"


def phrase(key: str, value: float) -> str:
    """A figure in running text: "PSNR 25.10 dB"."""
    name, unit, _ = FIGURES[key]
    return f"{name} {show(key, value)} {unit}".rstrip()


def models_dir() -> Path:
    """The folder holding the shipped models: vqtok/models/ in an installed wheel, else the checkout's models/
    beside vqtok/ (editable installs and running from the source tree)."""
    package = Path(__file__).resolve().parent
    installed = package / "models"
    return installed if installed.is_dir() else package.parent / "models"


def names() -> list[str]:
    """Names of the shipped models (those whose folder holds a model file), sorted."""
    root = models_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / MODEL_FILE).is_file())


def resolve(model: str | os.PathLike) -> Path:
    """The model file a MODEL argument means: a file at that path first, then the model file in a folder at
    that path (a training run's, or one of models/), else the shipped model of that name. Raises `VqtokError`
    for a folder with no model file in it, and listing the shipped names when nothing matches."""
    path = Path(model)
    if path.is_file():
        return path
    if (path / MODEL_FILE).is_file():
        return path / MODEL_FILE
    # Only a bare name can name a shipped model: "runs/mnist" is a path that does not exist.
    if path.name == str(model) and path.name in names():
        return models_dir() / path.name / MODEL_FILE
    if path.is_dir():
        raise VqtokError(f"{model}: a folder with no {MODEL_FILE} in it; MODEL is a model file, a folder holding "
                         "one (a training run), or a shipped model's name")
    if path.exists():
        return path
    shipped = ", ".join(names()) or "none installed"
    raise VqtokError(f"{model}: no such model file, and no shipped model has that name (shipped: {shipped})")


def means_a_model(source: Path) -> bool:
    """Whether `source` (a command's first argument, which may also be token files) means a model: a
    .safetensors file, a folder holding a model file (a training run), or a bare shipped name with nothing at
    that path."""
    if source.suffix == ".safetensors" or (source / MODEL_FILE).is_file():
        return True
    return not source.exists() and source.name == str(source) and source.name in names()


def cards() -> list[dict[str, Any]]:
    """The card.json of every shipped model, sorted by name."""
    found = []
    for name in names():
        path = models_dir() / name / CARD_FILE
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise VqtokError(f"{path}: unreadable model card ({err})") from None
    return found


def listing() -> list[dict[str, Any]]:
    """One entry per shipped model for `vqtok models`: name, modality, what it is for, size, where it is, and
    per stage count the token-file rates and quality figures measured on its held-out data (from its card)."""
    rows = []
    for card in cards():
        modality = card["modality"]
        keys = (*RATES[modality], *QUALITY[modality])
        rows.append({
            "name": card["name"],
            "modality": modality,
            "description": card["description"],
            "unit": UNITS[modality],
            "parameters": card["model"]["parameters"],
            "file_bytes": card["model"]["file_bytes"],
            "path": str(models_dir() / card["name"] / MODEL_FILE),
            "heldout": card["eval"]["data"],
            "heldout_files": card["eval"]["files"],
            "figures": [{"stages": int(row["stages"]), **{k: row[k] for k in keys if k in row}}
                        for row in card["eval"]["rows"]],
        })
    return rows
