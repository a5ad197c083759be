"""vqtok: VQ-VAE tokenizers for images and audio."""

__version__ = "0.1.0"
