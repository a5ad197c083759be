"""Shared fixtures: the bundled sample data (samples/) and the shared real data folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked `cuda` run where torch sees a GPU (`pytest -m cuda` selects them) and skip elsewhere."""
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def copy_first(source: Path, pattern: str, count: int, folder: Path) -> Path:
    """Copy the first `count` files of `source` matching `pattern` (sorted) into `folder` (created); returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    for src in sorted(source.glob(pattern))[:count]:
        shutil.copy(src, folder / src.name)
    return folder


@pytest.fixture(scope="session")
def sample_images() -> Path:
    """Folder of 1,000 MNIST PNGs (28x28 grayscale)."""
    return SAMPLES / "images"


@pytest.fixture(scope="session")
def sample_audio() -> Path:
    """Folder of 40 FSDD WAVs (8 kHz, 16-bit mono)."""
    return SAMPLES / "audio"


@pytest.fixture(scope="session")
def fsdd16(tmp_path_factory: pytest.TempPathFactory, sample_audio: Path) -> Path:
    """A folder of the first 16 sample WAVs (sorted): a small speech set the training tests read, never write."""
    return copy_first(sample_audio, "*.wav", 16, tmp_path_factory.mktemp("fsdd16"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (large real data sets); tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny convolutions gain nothing from threads, and on a busy machine OpenMP barriers make them crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def audio_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 8 kHz audio model, 8 samples a frame, 2 stages of 16 codes."""
    from vqtok.config import ModelConfig, QuantizerConfig
    from vqtok.modelfile import save_model
    from vqtok.nets.tokenizer import Tokenizer

    config = ModelConfig(modality="audio", in_channels=1, channels=16, res_blocks=1, sample_rate=8000,
                         audio_strides=(2, 4), downsample=8,
                         quantizer=QuantizerConfig(dim=8, codebook_size=16, stages=2))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("audio_model") / "audio.safetensors"
    save_model(Tokenizer(config), path)
    return path
