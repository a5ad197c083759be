"""Rate-distortion of a vqtok image model against JPEG and WebP on the same photos (BSDS500 val by default).

    python benchmarks/rate_distortion.py --model runs/bsds/model.safetensors
    python benchmarks/rate_distortion.py --model runs/bsds/model.safetensors --limit 20 --device cpu
    python benchmarks/rate_distortion.py                  # JPEG and WebP curves only

vqtok: for every stage count 1..S of the model, each image goes through `vqtok encode` (the library's
`encode_files`, with `--stages N`, once per codec: packed and entropy) and `vqtok decode` (`decode_files`, PNG at
the original size), so the rate is that of real `.vqt` files: 8 * file bytes / (H * W), averaged over images, and
the payload alone (the file less its 18 fixed bytes and JSON header). JPEG: Pillow at QUALITIES["JPEG"] with
optimize=True (its other defaults: 4:2:0 chroma subsampling, baseline); WebP: Pillow (libwebp) at
QUALITIES["WEBP"], method=6, lossy. Their rate is 8 * bytes / (H * W) of the encoded file in memory.

Every decoded image is scored against the original 8-bit RGB pixels: PSNR over all three channels (data range
255) and MS-SSIM (`vqtok.stats.ms_ssim`, 5 scales for these sizes), averaged over images. For each vqtok rate,
JPEG's and WebP's PSNR at the same bpp comes from linear interpolation on their (mean bpp, mean PSNR) curves
(nothing outside a curve's range), and the difference is vqtok minus codec (positive: vqtok better).

Prints a markdown table and writes results/rate_distortion.json, results/rate_distortion.png (PSNR against bpp,
one line per codec) and results/rate_distortion_crop.png (a 128 x 128 crop of the first image: original, JPEG at
the quality whose bpp on that image is nearest vqtok's, vqtok with all stages and the entropy codec).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vqtok import plots, stats  # noqa: E402
from vqtok.data import io as data  # noqa: E402
from vqtok.jobs.pipeline import decode_files, encode_files  # noqa: E402
from vqtok.modelfile import load  # noqa: E402
from vqtok.tokens.tokfile import FIXED_OVERHEAD_BYTES  # noqa: E402

DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "bsds500" / "val"
RESULTS = ROOT / "benchmarks" / "results"
# JPEG stops at 90: every BSDS500 image is itself a quality-95 4:2:0 JPEG, and re-encoding it with the same
# tables nearly reproduces its pixels (50.7 dB at 3.8 bpp over val, against 37.4 dB at quality 90). At the low
# end libjpeg's tables saturate at 255 (qualities 0 and 1 give the same file, 2 one a few bytes longer), so
# JPEG starts at 2; WebP goes on down to 0.
QUALITIES = {"JPEG": (2, 3, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90),
             "WEBP": (0, 2, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 95)}
PILLOW_OPTIONS = {"JPEG": {"optimize": True}, "WEBP": {"method": 6}}
CROP = 128
VQTOK_CODECS = ("packed", "entropy")
LABELS = {"jpeg": "JPEG", "webp": "WebP"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a vqtok image model (model.safetensors); without it only JPEG and WebP")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of photos (default: BSDS500 val)")
    p.add_argument("--limit", type=int, help="use the first N images (sorted by path)")
    p.add_argument("--device", default="auto", help="device for the model (auto, cpu, cuda, ...)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and the two PNGs")
    return p.parse_args()


def score(original: torch.Tensor, decoded: torch.Tensor, name: str) -> tuple[float, float]:
    """(PSNR in dB, MS-SSIM) of a decoded image against the original, both uint8 (3, H, W); `name` (the file)
    goes into the error when the sizes differ."""
    if decoded.shape != original.shape:
        raise SystemExit(f"error: {name}: decoded to {tuple(decoded.shape)}, the original is {tuple(original.shape)}")
    x, y = original[None].double() / 255.0, decoded[None].double() / 255.0
    return float(stats.psnr(y, x)[0]), float(stats.ms_ssim(y.float(), x.float())[0])


def pillow_round_trip(image: torch.Tensor, fmt: str, quality: int) -> tuple[int, torch.Tensor]:
    """Encode uint8 (3, H, W) with Pillow as `fmt` ("JPEG" or "WEBP") at `quality` in memory: (file bytes,
    decoded uint8 (3, H, W))."""
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format=fmt, quality=quality, **PILLOW_OPTIONS[fmt])
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return len(buf.getvalue()), torch.from_numpy(decoded.transpose(2, 0, 1).copy())


def codec_curve(originals: dict[Path, torch.Tensor], fmt: str) -> list[dict]:
    """One point per quality: mean bpp, PSNR and MS-SSIM over the images (uint8 (3, H, W) by path), and each
    image's bpp by file name."""
    curve = []
    for quality in QUALITIES[fmt]:
        bpp, psnr, msssim = {}, [], []
        for path, image in originals.items():
            size, decoded = pillow_round_trip(image, fmt, quality)
            bpp[path.name] = 8.0 * size / (image.shape[1] * image.shape[2])
            p, m = score(image, decoded, path.name)
            psnr.append(p)
            msssim.append(m)
        curve.append({"quality": quality, "bpp": float(np.mean(list(bpp.values()))), "psnr": float(np.mean(psnr)),
                      "ms_ssim": float(np.mean(msssim)), "image_bpp": bpp})
    return curve


def payload_bytes(token_file: bytes) -> int:
    """A token file's payload length: the file less its fixed fields and JSON header (vqtok.tokens.tokfile)."""
    return len(token_file) - FIXED_OVERHEAD_BYTES - int.from_bytes(token_file[6:10], "little")


def vqtok_rate(model: Path, originals: dict[Path, torch.Tensor], stages: int, device: str,
               work: Path) -> tuple[dict, dict[str, float], dict[str, torch.Tensor]]:
    """Encode the images with the first `stages` stages, once per codec, decode the packed files and score them.

    originals: uint8 (3, H, W) by path. Returns the row (mean bpp of file and payload per codec, PSNR,
    MS-SSIM), and by file name each image's entropy-coded file bpp and its decoded uint8 (3, H, W).
    """
    run, paths = work / f"stages-{stages}", list(originals)
    files: dict[str, dict[str, bytes]] = {}
    for codec in VQTOK_CODECS:
        report = encode_files(model, paths, run / codec, codec=codec, stages=stages, device=device, num_workers=0)
        if report.failed:
            raise SystemExit(f"error: {report.failed[0][0]}: {report.failed[0][1]}")
        # Inputs named one by one are mirrored by file name: a.jpg -> a.jpg.vqt.
        files[codec] = {p.name: (run / codec / f"{p.name}.vqt").read_bytes() for p in paths}
    report = decode_files(model, [run / "packed"], run / "decoded", device=device)
    if report.failed:
        raise SystemExit(f"error: {report.failed[0][0]}: {report.failed[0][1]}")
    pixels = {p.name: originals[p].shape[1] * originals[p].shape[2] for p in paths}
    row: dict = {"stages": stages}
    for codec in VQTOK_CODECS:
        blobs = files[codec]
        row[f"bpp_{codec}_file"] = float(np.mean([8.0 * len(b) / pixels[n] for n, b in blobs.items()]))
        row[f"bpp_{codec}_payload"] = float(np.mean([8.0 * payload_bytes(b) / pixels[n] for n, b in blobs.items()]))
    decoded = {p.name: data.load_image(run / "decoded" / f"{p.stem}.png") for p in paths}
    scores = [score(originals[p], decoded[p.name], p.name) for p in paths]
    row["psnr"], row["ms_ssim"] = (float(v) for v in np.mean(scores, axis=0))
    entropy_bpp = {n: 8.0 * len(b) / pixels[n] for n, b in files["entropy"].items()}
    return row, entropy_bpp, decoded


def interpolate(curve: list[dict], bpp: float, key: str = "psnr") -> float | None:
    """`key` on a codec's curve at `bpp`, linear between its two nearest points; None outside the curve."""
    points = sorted((p["bpp"], p[key]) for p in curve)
    xs, ys = [x for x, _ in points], [y for _, y in points]
    if not xs[0] <= bpp <= xs[-1]:
        return None
    return float(np.interp(bpp, xs, ys))


def compare(row: dict, curves: dict[str, list[dict]]) -> None:
    """Add each codec's PSNR at the row's packed and entropy file bpp, and vqtok's lead in dB, to `row`."""
    for name, curve in curves.items():
        for codec in VQTOK_CODECS:
            theirs = interpolate(curve, row[f"bpp_{codec}_file"])
            row[f"{name}_psnr_at_{codec}"] = theirs
            row[f"gain_db_vs_{name}_at_{codec}"] = None if theirs is None else row["psnr"] - theirs


def crop_picture(originals: dict[Path, torch.Tensor], jpeg: list[dict], vqtok_bpp: dict[str, float],
                 vqtok_decoded: dict[str, torch.Tensor], stages: int, path: Path) -> dict:
    """The centre CROP x CROP of the first image: original | JPEG at the quality nearest vqtok's bpp on that
    image | vqtok (entropy-coded), labelled with the whole image's bpp and PSNR. Returns what it shows."""
    first = next(iter(originals))
    image, name = originals[first], first.name
    point = min(jpeg, key=lambda p: abs(p["image_bpp"][name] - vqtok_bpp[name]))
    _, jpeg_image = pillow_round_trip(image, "JPEG", point["quality"])
    h, w = image.shape[1:]
    top, left = max(0, (h - CROP) // 2), max(0, (w - CROP) // 2)
    crop = (slice(None), slice(top, top + CROP), slice(left, left + CROP))
    jpeg_psnr, vq_psnr = score(image, jpeg_image, name)[0], score(image, vqtok_decoded[name], name)[0]
    panels = [
        (f"original {name}\ncrop at y={top}, x={left}\n(bpp, dB: whole image)", image[crop]),
        (f"JPEG q{point['quality']}\n{point['image_bpp'][name]:.3f} bpp, {jpeg_psnr:.2f} dB", jpeg_image[crop]),
        (f"vqtok {stages} stages, entropy\n{vqtok_bpp[name]:.3f} bpp, {vq_psnr:.2f} dB", vqtok_decoded[name][crop]),
    ]
    plots.crop_comparison(panels, path)
    return {"image": name, "top": top, "left": left, "size": CROP, "jpeg_quality": point["quality"],
            "jpeg_bpp": point["image_bpp"][name], "jpeg_psnr": jpeg_psnr, "vqtok_stages": stages,
            "vqtok_bpp": vqtok_bpp[name], "vqtok_psnr": vq_psnr}


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_tables(curves: dict[str, list[dict]], rows: list[dict]) -> None:
    """The codec curves, then the vqtok rates with the codecs' PSNR at equal (entropy-coded) bpp."""
    print("| codec | quality | bpp | PSNR (dB) | MS-SSIM |\n|---|---:|---:|---:|---:|")
    for name, curve in curves.items():
        for p in curve:
            print(f"| {name} | {p['quality']} | {p['bpp']:.3f} | {p['psnr']:.2f} | {p['ms_ssim']:.4f} |")
    if not rows:
        return
    print("\n| stages | packed bpp (file / payload) | entropy bpp (file / payload) | PSNR (dB) | MS-SSIM "
          "| JPEG dB at entropy bpp | vs JPEG (dB) | WebP dB at entropy bpp | vs WebP (dB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['stages']} | {r['bpp_packed_file']:.4f} / {r['bpp_packed_payload']:.4f} "
              f"| {r['bpp_entropy_file']:.4f} / {r['bpp_entropy_payload']:.4f} | {r['psnr']:.2f} | {r['ms_ssim']:.4f} "
              f"| {_cell(r['jpeg_psnr_at_entropy'], '.2f')} | {_cell(r['gain_db_vs_jpeg_at_entropy'], '+.2f')} "
              f"| {_cell(r['webp_psnr_at_entropy'], '.2f')} | {_cell(r['gain_db_vs_webp_at_entropy'], '+.2f')} |")


def find_images(folder: Path, limit: int | None) -> dict[Path, torch.Tensor]:
    """The first `limit` images under `folder` (sorted by path), uint8 (3, H, W) by path; exits with an error
    when two images share a name without its extension (decoded PNGs are named by it)."""
    modality, paths = data.find_inputs([folder])
    if modality != "image":
        raise SystemExit(f"error: {folder} holds audio, not images")
    paths = sorted(paths)[:limit]
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        raise SystemExit(f"error: {folder}: two images share a name (without extension); rename one")
    return {p: data.load_image(p) for p in paths}


def main() -> None:
    args = parse_args()
    if not args.images.is_dir():
        print(f"skipped: {args.images} is absent (BSDS500 val is ../shared/data/bsds500/val)", file=sys.stderr)
        return
    originals = find_images(args.images, args.limit)
    print(f"{len(originals)} images from {args.images}", file=sys.stderr)
    curves = {"jpeg": codec_curve(originals, "JPEG"), "webp": codec_curve(originals, "WEBP")}
    # The per-image rates only serve the crop picture; the JSON keeps the means.
    means = {name: [{k: v for k, v in p.items() if k != "image_bpp"} for p in c] for name, c in curves.items()}
    result: dict = {"images": str(args.images), "count": len(originals), "pillow": PIL.__version__,
                    "model": None, "vqtok": [], **means}
    plot_curves = {LABELS[name]: [(p["bpp"], p["psnr"]) for p in c] for name, c in curves.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        print("no --model: JPEG and WebP curves only, no crop picture", file=sys.stderr)
    else:
        model = load(args.model)
        q = model.config.quantizer
        result["model"] = {"path": str(args.model), "downsample": model.config.downsample, "stages": q.stages,
                           "codebook_size": q.codebook_size, "fingerprint": model.fingerprint()}
        with tempfile.TemporaryDirectory() as work:
            for stages in range(1, q.stages + 1):
                row, entropy_bpp, decoded = vqtok_rate(args.model, originals, stages, args.device, Path(work))
                compare(row, curves)
                result["vqtok"].append(row)
            result["crop"] = crop_picture(originals, curves["jpeg"], entropy_bpp, decoded, q.stages,
                                          args.out / "rate_distortion_crop.png")
        for codec in VQTOK_CODECS:
            plot_curves[f"vqtok {codec}"] = [(r[f"bpp_{codec}_file"], r["psnr"]) for r in result["vqtok"]]
    print_tables(curves, result["vqtok"])
    plots.rate_distortion_plot(plot_curves, args.out / "rate_distortion.png",
                               title=f"{args.images.name}: {len(originals)} images, PSNR on 8-bit RGB")
    (args.out / "rate_distortion.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out / 'rate_distortion.json'}, rate_distortion.png"
          + (", rate_distortion_crop.png" if args.model else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
