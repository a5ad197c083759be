"""vqtok: VQ-VAE tokenizers for images and audio.

    import vqtok
    model = vqtok.load("runs/photos/model.safetensors")
    codes = model.encode(images)            # (B, 3, H, W) in [0, 1] -> (B, stages, H/f, W/f) int64
    images = model.decode(codes)
"""

__version__ = "0.1.0"

from .errors import TokenFileError, VqtokError  # noqa: E402
from .modelfile import load, save_model  # noqa: E402
from .nets import Tokenizer  # noqa: E402
from .quantize import ResidualVQ, VectorQuantizer, rotation_trick  # noqa: E402
from .shards import TokenDataset  # noqa: E402
from .tokfile import Tokens, read_tokens, write_tokens  # noqa: E402

__all__ = [
    "__version__",
    "load",
    "save_model",
    "Tokenizer",
    "VectorQuantizer",
    "ResidualVQ",
    "rotation_trick",
    "read_tokens",
    "write_tokens",
    "Tokens",
    "TokenDataset",
    "TokenFileError",
    "VqtokError",
]
