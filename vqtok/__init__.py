"""vqtok: VQ-VAE tokenizers for images and audio.

    import vqtok
    model = vqtok.load("runs/photos/model.safetensors")
    codes = model.encode(images)            # (B, 3, H, W) in [0, 1] -> (B, stages, H/f, W/f) int64
    images = model.decode(codes)

The names below are imported on first use, so `import vqtok` (and `vqtok --help`) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load": "vqtok.modelfile",
    "save_model": "vqtok.modelfile",
    "Tokenizer": "vqtok.nets.tokenizer",
    "VectorQuantizer": "vqtok.quantize",
    "ResidualVQ": "vqtok.quantize",
    "rotation_trick": "vqtok.quantize",
    "read_tokens": "vqtok.tokens.tokfile",
    "write_tokens": "vqtok.tokens.tokfile",
    "Tokens": "vqtok.tokens.tokfile",
    "TokenDataset": "vqtok.tokens.shards",
    "TokenFileError": "vqtok.errors",
    "VqtokError": "vqtok.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vqtok' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
