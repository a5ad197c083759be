"""Images of any size in bounded memory: encode and decode in overlapping tiles.

The code grid is cut into square cores of `tile` pixels (whole code cells). Each core is computed from a
window that reaches past it by the receptive field of the stage at work (`image_encoder_context` pixels,
rounded up to whole cells, for encoding; `image_decoder_context` cells for decoding), clipped at the image's
edges. A window that touches an edge of the image therefore sees the same zero padding as a whole-image
forward, and every other window border lies far enough out that its padding cannot reach the core; only the
core of each window is kept. Memory holds the uint8 image (or the decoded output), the codes, and the
activations of one window (about 200 bytes per window pixel: 60 MB for a default window), whatever the image
size.

Exactness. The codes equal those of a whole-image encode, bit for bit, because every number that feeds them
is computed the same way in a window as in the whole image:

- Convolutions run on PyTorch's own kernels (im2col + GEMM over a fixed reduction length), not oneDNN's.
  oneDNN picks its algorithm and its split across threads from the tensor sizes, so an output can differ in
  the last bit between a window and the whole image, and a code whose two nearest entries are that close
  flips. PyTorch's kernels gave identical outputs for every window size tried, with 1 and 2 threads; they
  take about twice as long as oneDNN on a CPU.
- The nearest-code search runs on blocks of exactly `BLOCK_ROWS` rows (the last one zero-padded), so every
  row goes through a matmul of one shape: below `search.FAISS_MIN_ROWS`, and one block of the torch search.
  faiss (which the search picks for 2,048 rows and more) or a matmul of another height can break near-ties
  the other way; a one-row matmul did so for 10 rows in 51,200.

The whole-image encode these equal is `encode_tiled` with a tile at least as large as the image: one window.
`Tokenizer.encode` (oneDNN, faiss) agrees with it except at near-ties: measured on 10 BSDS500 photos with a
k-means-initialised default model, 16 codes in 98,010 differ at downsample 4 (oneDNN alone, on 8x8-cell
windows: 5; faiss alone, on the whole image: 9), 44 in 50,020 at downsample 8 (34; 16). `decode_tiled` likewise equals a
one-window decode in every output byte. On a GPU, cuDNN also chooses algorithms by shape, so tiled and
whole-image results agree there only up to such near-ties.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from vqtok.data import io as data
from vqtok.errors import VqtokError
from vqtok.nets.tokenizer import Tokenizer, image_decoder_context, image_encoder_context
from vqtok.tokens.tokfile import peek_header

# Side of a tile's core in pixels. Windows of 512 + 2 * 16 pixels (downsample 4) cost ~60 MB of activations;
# the margins add 13% of work at downsample 4, 27% at 8 and 56% at 16.
TILE = 512

# Images above this many pixels are encoded and decoded in tiles. A whole-image forward costs ~90-200 bytes of
# activations per pixel (oneDNN and PyTorch kernels, default model), so up to ~400 MB here; beyond, tiles keep
# memory flat and the codes do not depend on the tile size.
WHOLE_IMAGE_PIXELS = 1 << 21


def needs_tiles(height: int, width: int) -> bool:
    """Whether an image of height x width pixels should go through `encode_tiled` / `decode_tiled` rather than
    one whole-image forward: above `WHOLE_IMAGE_PIXELS` pixels."""
    return height * width > WHOLE_IMAGE_PIXELS


@contextlib.contextmanager
def _native_convolutions() -> Iterator[None]:
    """Run CPU convolutions on PyTorch's own kernels rather than oneDNN's, whose results depend on the tensor
    sizes. The switch is process-wide; the previous setting comes back on exit."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def _spans(cells: int, core: int, margin: int) -> Iterator[tuple[int, int, int, int]]:
    """Cut [0, cells) into cores of `core` cells: (core start, core stop, window start, window stop), the window
    reaching `margin` cells past the core on each side, clipped to [0, cells)."""
    for start in range(0, cells, core):
        stop = min(start + core, cells)
        yield start, stop, max(0, start - margin), min(cells, stop + margin)


def _tiles(rows: int, cols: int, core: int, margin: int) -> Iterator[tuple[tuple[int, int, int, int], ...]]:
    """Every (row span, column span) pair of `_spans`, row-major."""
    col_spans = list(_spans(cols, core, margin))
    for row_span in _spans(rows, core, margin):
        for col_span in col_spans:
            yield row_span, col_span


def _quantize(model: Tokenizer, z: torch.Tensor, stages: int | None) -> torch.Tensor:
    """Encoder output z (D, h, w) -> codes (S, h, w) int64 on the CPU, searched in blocks of one size."""
    dim, h, w = z.shape
    return model.quantizer.encode_blocks(z.movedim(0, -1).reshape(-1, dim), stages).cpu().T.reshape(-1, h, w)


def _window(image: torch.Tensor, top: int, bottom: int, left: int, right: int, hop: int) -> torch.Tensor:
    """Pixels [top, bottom) x [left, right) of `image` (3, H, W) padded to whole cells: rows and columns past
    the image repeat its last ones, as `data.pad_to_multiple` pads the whole image."""
    return data.pad_to_multiple(image[:, top:bottom, left:right], hop)[0]


@torch.no_grad()
def encode_tiled(model: Tokenizer, image: torch.Tensor, stages: int | None = None, tile: int = TILE) -> torch.Tensor:
    """Codes of one image, tile by tile: uint8 (3, H, W), any H and W -> int64 (S, ceil(H / hop), ceil(W / hop)).

    The image need not be padded: windows at the bottom and right edges are edge-replicated to whole cells
    here, exactly as `data.pad_to_multiple` pads the whole image, so the caller never copies it. `stages`:
    the first S residual stages (default all). `tile`: core side in pixels, rounded down to whole code cells
    (at least one). The codes do not depend on `tile` (see the module docstring).
    """
    if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"encode_tiled expects a uint8 (3, H, W) image, got {image.dtype} {tuple(image.shape)}")
    total = model.config.quantizer.stages
    if stages is not None and not 1 <= stages <= total:
        raise VqtokError(f"stages must be in [1, {total}], got {stages}")
    hop = model.hop
    rows, cols = -(-image.shape[1] // hop), -(-image.shape[2] // hop)
    margin = -(-image_encoder_context(model.encoder) // hop)
    device = next(model.parameters()).device
    codes = torch.empty(stages or total, rows, cols, dtype=torch.long)
    with _native_convolutions():
        for (r0, r1, wr0, wr1), (c0, c1, wc0, wc1) in _tiles(rows, cols, max(1, tile // hop), margin):
            x = _window(image, wr0 * hop, wr1 * hop, wc0 * hop, wc1 * hop, hop).to(device).float().div_(255.0)
            z = model.encoder(x[None])[0, :, r0 - wr0:r1 - wr0, c0 - wc0:c1 - wc0]
            codes[:, r0:r1, c0:c1] = _quantize(model, z, stages)
    return codes


@torch.no_grad()
def decode_tiled(model: Tokenizer, codes: torch.Tensor, tile: int = TILE,
                 size: tuple[int, int] | None = None) -> torch.Tensor:
    """Image of codes (S, h, w), tile by tile -> uint8 (3, H, W), (H, W) = `size` (default (h, w) * hop).

    `size` crops to the original image (it must need exactly h x w cells) without a full-size copy. Pixels are
    the decoder's [0, 1] output, clamped, times 255, rounded: what `data.save_image` makes of `model.decode`.
    The result is a (3, H, W) view of channels-last memory, which `data.save_image` hands to Pillow as is.
    `tile`: core side in pixels, rounded down to whole code cells (at least one); the output does not depend on it.
    """
    if codes.dim() != 3:
        raise ValueError(f"decode_tiled expects codes (S, h, w), got shape {tuple(codes.shape)}")
    hop = model.hop
    rows, cols = codes.shape[1:]
    height, width = size or (rows * hop, cols * hop)
    if (-(-height // hop), -(-width // hop)) != (rows, cols):
        raise ValueError(f"an image of {height}x{width} pixels needs {-(-height // hop)}x{-(-width // hop)} "
                         f"code cells at downsample {hop}, got {rows}x{cols}")
    margin = image_decoder_context(model.decoder)
    device = next(model.parameters()).device
    out = np.empty((height, width, 3), dtype=np.uint8)
    with _native_convolutions():
        for (r0, r1, wr0, wr1), (c0, c1, wc0, wc1) in _tiles(rows, cols, max(1, tile // hop), margin):
            y = model.decode(codes[None, :, wr0:wr1, wc0:wc1].to(device, torch.long))[0]
            top, bottom, left, right = r0 * hop, min(r1 * hop, height), c0 * hop, min(c1 * hop, width)
            block = y[:, top - wr0 * hop:bottom - wr0 * hop, left - wc0 * hop:right - wc0 * hop]
            out[top:bottom, left:right] = block.mul_(255.0).round_().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return torch.from_numpy(out).permute(2, 0, 1)


def checked_image_size(token_path: Path, hop: int) -> tuple[int, int] | None:
    """The original (H, W) an image token file decodes to, read from its header before any code is.

    Refuses (`VqtokError` naming the file) a header without a valid `original_size`, one whose grid is not the
    ceil(H / hop) x ceil(W / hop) cells that size needs, and one above `data.MAX_IMAGE_PIXELS` pixels: encode
    refuses such inputs, so such a file is damaged or built to make decode allocate without bound. None when
    the header cannot be read at all; `read_tokens` then reports why.
    """
    header = peek_header(token_path)
    if header is None:
        return None
    size, grid = header.get("original_size"), header.get("grid")
    if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int and v >= 1 for v in size)):
        raise VqtokError(f"{token_path}: not an image token file (no valid original_size in the header)")
    height, width = size
    if height * width > data.MAX_IMAGE_PIXELS:
        raise VqtokError(f"{token_path}: claims a {height}x{width} image, more than the {data.MAX_IMAGE_PIXELS:,} "
                         "pixels allowed (decompression-bomb guard)")
    cells = [-(-height // hop), -(-width // hop)]
    if grid != cells:
        raise VqtokError(f"{token_path}: a {height}x{width} image needs a {cells[0]}x{cells[1]} code grid at "
                         f"downsample {hop}, the header says {grid}")
    return height, width

