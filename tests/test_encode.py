"""`vqtok encode` at scale: decoding in worker processes, batching by shape, writing on a background thread,
parts of the file list (--part, torchrun), reruns after a crash, and bad files met by a worker."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vqtok.cli import app
from vqtok.config import ModelConfig, QuantizerConfig
from vqtok.data import io as data
from vqtok.data.readers import PENDING_BATCHES, Chunk, ShapeGroup, batch_rows, shape_batches
from vqtok.errors import VqtokError
from vqtok.jobs.encoding import (OrderedWriter, forward_threads, one_intra_op_thread, parallel_map, parse_part,
                                 process_part, take_part)
from vqtok.jobs import pipeline
from vqtok.jobs.pipeline import (CPU_BATCH_IMAGES, CPU_BATCH_PIXELS, ENCODE_JOB_FILES, encode_batch, encode_files,
                                 encode_job_files)
from vqtok.modelfile import load, save_model
from vqtok.nets.tokenizer import Tokenizer
from vqtok.tokens.shards import TokenDataset
from vqtok.tokens.tokfile import read_tokens

runner = CliRunner()
# (height, width) of the odd-sized images mixed into the folder: three padded shapes besides MNIST's 28x28.
ODD_SIZES = [(37, 21), (13, 50), (37, 21), (30, 30)]


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, sample_images: Path) -> Path:
    """40 MNIST digits (half in a subfolder) and 4 odd-sized colour images between them."""
    folder = tmp_path_factory.mktemp("data") / "images"
    (folder / "sub").mkdir(parents=True)
    for i, src in enumerate(sorted(sample_images.glob("*.png"))[:40]):
        shutil.copy(src, (folder / "sub" if i % 2 else folder) / src.name)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(ODD_SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"odd{i}.png")
    return folder


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory, images: Path) -> Path:
    """An untrained 2-stage model whose codes vary with the input the way a trained model's do, and where every
    code has a near-twin: each codebook holds 16 encoder outputs of the images plus noise, and each again,
    moved by 1e-6 of their spread. A vector then sits almost exactly between two codes, and a last-bit change
    in the encoder output or the search flips it, so any dependence of the codes on the batch shows (on 64
    MNIST digits, `Tokenizer.encode` in batches of 1 and of 64 gives about 1,000 different codes in 6,272).
    """
    torch.manual_seed(0)
    config = ModelConfig(channels=16, res_channels=8, res_blocks=1,
                         quantizer=QuantizerConfig(dim=8, codebook_size=32, stages=2))
    model = Tokenizer(config).eval()
    _, paths = data.find_inputs([images])
    x = torch.stack([data.load_image(p) for p in paths if not p.name.startswith("odd")][:16]).float() / 255
    with torch.no_grad():
        residual = model._to_vectors(model.encoder(x))
        for vq in model.quantizer.quantizers:
            picked = residual[torch.randint(len(residual), (16,))]
            picked = picked + 0.3 * residual.std() * torch.randn_like(picked)
            vq.codebook.copy_(torch.cat([picked, picked + 1e-6 * residual.std() * torch.randn_like(picked)]))
            residual = residual - vq.codes()[vq.encode(residual)]
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_model(model, path)
    return path


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative posix name -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory, model_path: Path, images: Path) -> dict[str, dict[str, bytes]]:
    """A whole run decoding in this process, one file per read: the reference for .vqt files and for a shard."""
    runs = {}
    for shard in (False, True):
        out = tmp_path_factory.mktemp("whole")
        report = encode_files(model_path, [images], out, device="cpu", batch_size=1, num_workers=0, shard=shard)
        assert not report.failed
        runs["shard" if shard else "vqt"] = tree(out)
    return runs


@pytest.mark.parametrize("workers, batch_size", [(1, 64), (2, 7), (2, 2)])
@pytest.mark.parametrize("shard", [False, True])
def test_outputs_do_not_depend_on_workers_or_batch_size(model_path: Path, images: Path, tmp_path: Path,
                                                        whole: dict, workers: int, batch_size: int,
                                                        shard: bool) -> None:
    report = encode_files(model_path, [images], tmp_path, device="cpu", batch_size=batch_size,
                          num_workers=workers, shard=shard)
    assert not report.failed and report.tokens == 40 * 2 * 49 + 2 * (2 * 10 * 6) + 2 * 4 * 13 + 2 * 8 * 8
    assert tree(tmp_path) == whole["shard" if shard else "vqt"]


@pytest.mark.parametrize("shard", [False, True])
def test_workers_that_only_decode_give_the_same_outputs(model_path: Path, images: Path, tmp_path: Path,
                                                       whole: dict, shard: bool, monkeypatch) -> None:
    """The path of an accelerator, and of a CPU whose workers cannot fork: workers decode, this process encodes
    and writes."""
    monkeypatch.setattr(pipeline, "FORKED_WORKERS", False)
    report = encode_files(model_path, [images], tmp_path, device="cpu", batch_size=5, num_workers=2, shard=shard)
    assert not report.failed
    assert tree(tmp_path) == whole["shard" if shard else "vqt"]


def test_encode_jobs_fill_batches_and_share_short_lists() -> None:
    assert encode_job_files(10_000, 32, 2) == ENCODE_JOB_FILES  # whole batches of small images
    assert encode_job_files(10_000, 1000, 2) == 1000
    assert encode_job_files(100, 32, 2) == 13  # 8 jobs: both workers busy to the end
    assert encode_job_files(1, 32, 16) == 1


def test_parallel_map_keeps_the_order_and_raises_the_first_error() -> None:
    def slow_square(i: int) -> int:
        time.sleep(0.01 * (i % 3))
        return i * i

    assert list(parallel_map(slow_square, ((i,) for i in range(20)), 3)) == [i * i for i in range(20)]
    taken = []

    def jobs():
        for i in range(100):
            taken.append(i)
            yield (i,)

    def fail_at_five(i: int) -> int:
        if i == 5:
            raise VqtokError("five")
        return i

    with pytest.raises(VqtokError, match="five"):
        list(parallel_map(fail_at_five, jobs(), 2))
    assert len(taken) <= 5 + 2 * 2
    assert [forward_threads(cores) for cores in (1, 2, 16, 64)] == [1, 2, 8, 8]
    torch.set_num_threads(3)
    with one_intra_op_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 3
    torch.set_num_threads(1)


def test_token_files_hold_the_codes_of_each_image(model_path: Path, images: Path, whole: dict,
                                                  tmp_path: Path) -> None:
    model = load(model_path)
    for name in ("odd1.png", "sub/" + sorted(p.name for p in (images / "sub").iterdir())[0]):
        (tmp_path / "t.vqt").write_bytes(whole["vqt"][name + ".vqt"])
        tokens = read_tokens(tmp_path / "t.vqt")
        image = data.load_image(images / name)
        padded, size = data.pad_to_multiple(image, model.hop)
        assert tokens.header["original_size"] == list(size) and tokens.header["source"] == name
        rows = batch_rows(padded.shape, CPU_BATCH_IMAGES, CPU_BATCH_PIXELS)
        assert np.array_equal(tokens.codes, encode_batch(model, padded[None], None, rows)[0].numpy())


def test_encode_batch_codes_depend_only_on_the_image(model_path: Path, images: Path) -> None:
    model = load(model_path)
    _, paths = data.find_inputs([images])
    x = torch.stack([data.load_image(p) for p in paths if not p.name.startswith("odd")])
    alone = torch.cat([encode_batch(model, image[None], None, 64) for image in x])
    assert torch.equal(encode_batch(model, x.flip(0), None, 64).flip(0), alone)
    assert torch.equal(encode_batch(model, x[:7], 1, 64), alone[:7, :1])
    plain = torch.cat([model.encode(x[i:i + 8].float() / 255) for i in range(0, len(x), 8)])
    assert (plain == alone).float().mean() > 0.5  # the same model, up to near-ties


def test_parts_together_equal_a_whole_run(model_path: Path, images: Path, whole: dict, tmp_path: Path) -> None:
    for i in (1, 2, 3):
        result = invoke("encode", model_path, images, "--out", tmp_path / f"part{i}", "--part", f"{i}/3",
                        "--device", "cpu", "--num-workers", "1", "--json")
        assert result.exit_code == 0, result.output
    parts = [tree(tmp_path / f"part{i}") for i in (1, 2, 3)]
    assert sum(len(p) for p in parts) == len(whole["vqt"]) == 44
    assert {k: v for p in parts for k, v in p.items()} == whole["vqt"]
    assert 14 <= min(len(p) for p in parts) <= max(len(p) for p in parts) <= 15


def test_part_shards_read_as_one_data_set(model_path: Path, images: Path, tmp_path: Path) -> None:
    for i in (2, 1):
        result = invoke("encode", model_path, images, "--out", tmp_path / "parts", "--shard", "--part", f"{i}/2",
                        "--device", "cpu", "--json")
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "parts").glob("*.shard.json")) == [
        "shard-00001-of-00002.shard.json", "shard-00002-of-00002.shard.json"]
    assert invoke("encode", model_path, images, "--out", tmp_path / "one", "--shard", "--device", "cpu").exit_code == 0
    parts, one = TokenDataset(tmp_path / "parts"), TokenDataset(tmp_path / "one")
    assert len(parts) == len(one) == 44
    for i in range(len(one)):
        assert parts.meta(i) == one.meta(i) and torch.equal(parts[i], one[i])


def test_torchrun_processes_take_their_share(model_path: Path, images: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        encode_files(model_path, [images], tmp_path / "run", device="cpu", shard=True)
    # --part 2/2 under two processes: part 2 of 2, split again: parts 3 and 4 of 4.
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        encode_files(model_path, [images], tmp_path / "split", device="cpu", shard=True, part=(2, 2))
    monkeypatch.delenv("WORLD_SIZE")
    encode_files(model_path, [images], tmp_path / "one", device="cpu", shard=True)
    run, one = TokenDataset(tmp_path / "run"), TokenDataset(tmp_path / "one")
    assert [run.meta(i) for i in range(len(run))] == [one.meta(i) for i in range(len(one))]
    assert sorted(p.name for p in (tmp_path / "split").glob("*.json")) == [
        "shard-00003-of-00004.shard.json", "shard-00004-of-00004.shard.json"]
    split = TokenDataset(tmp_path / "split")
    assert [split.meta(i) for i in range(len(split))] == [one.meta(i) for i in range(22, 44)]


def test_an_empty_part_writes_nothing_and_succeeds(model_path: Path, images: Path, tmp_path: Path) -> None:
    two = [images / "odd0.png", images / "odd1.png"]
    result = invoke("encode", model_path, *two, "--out", tmp_path / "t", "--shard", "--part", "1/3", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["written"] == 0 and not (tmp_path / "t").exists()


def test_parts_cover_the_list_exactly_once() -> None:
    for n_items in (0, 1, 5, 44, 97):
        items = list(range(n_items))
        for count in (1, 2, 3, 7, 100):
            parts = [take_part(items, (i, count)) for i in range(1, count + 1)]
            assert [x for p in parts for x in p] == items
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("text", ["0/3", "4/3", "x", "2", "1/0", "-1/2", "a/b", "1/2/3"])
def test_bad_part_is_a_one_line_error(model_path: Path, images: Path, tmp_path: Path, text: str) -> None:
    result = invoke("encode", model_path, images, "--out", tmp_path, "--part", text, "--device", "cpu")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --part must be I/N") and repr(text) in lines[0]
    assert not any(tmp_path.iterdir())


def test_bad_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(VqtokError, match="RANK"):
        process_part(None)
    assert parse_part("3/3") == (3, 3)


def test_rerun_writes_only_what_is_missing(model_path: Path, images: Path, whole: dict, tmp_path: Path) -> None:
    out = tmp_path / "t"
    assert invoke("encode", model_path, images, "--out", out, "--device", "cpu").exit_code == 0
    gone = sorted(out.rglob("*.vqt"))[::10]
    for path in gone:
        path.unlink()
    result = invoke("encode", model_path, images, "--out", out, "--device", "cpu", "--num-workers", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["written"] == len(gone) and report["skipped_existing"] == 44 - len(gone)
    assert tree(out) == whole["vqt"]


def test_crashed_part_shard_is_redone_and_finished_parts_are_kept(model_path: Path, images: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "parts"
    encode_files(model_path, [images], out, device="cpu", shard=True, part=(1, 2))
    finished = tree(out)

    def crash(path: Path, outcome: str) -> None:
        if path.name.startswith("odd"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encode_files(model_path, [images], out, device="cpu", shard=True, part=(2, 2), num_workers=2, on_file=crash)
    assert tree(out) == finished  # the crashed part left nothing behind, not even its temporary file
    reports = [encode_files(model_path, [images], out, device="cpu", shard=True, part=(i, 2)) for i in (1, 2)]
    assert [len(r.existing) for r in reports] == [22, 0] and [len(r.written) for r in reports] == [0, 22]
    assert len(TokenDataset(out)) == 44


def test_a_folder_split_another_way_is_refused(model_path: Path, images: Path, tmp_path: Path) -> None:
    encode_files(model_path, [images], tmp_path, device="cpu", shard=True, part=(1, 2))
    with pytest.raises(VqtokError, match="split into 2 part"):
        encode_files(model_path, [images], tmp_path, device="cpu", shard=True, part=(1, 3))
    with pytest.raises(VqtokError, match="split into 2 part"):
        encode_files(model_path, [images], tmp_path, device="cpu", shard=True)


def test_bad_files_met_by_workers_are_reported_and_the_rest_written(model_path: Path, images: Path,
                                                                    tmp_path: Path) -> None:
    src = tmp_path / "mixed"
    shutil.copytree(images, src)
    (src / "sub" / "zero.png").write_bytes(b"")
    (src / "text.jpg").write_text("hello")
    good = (src / "odd0.png").read_bytes()
    (src / "cut.png").write_bytes(good[: len(good) // 2])
    result = invoke("encode", model_path, src, "--out", tmp_path / "t", "--device", "cpu", "--num-workers", "2",
                    "--batch-size", "4", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["written"] == 44 and len(list((tmp_path / "t").rglob("*.vqt"))) == 44
    assert sorted(Path(f["file"]).name for f in report["failed"]) == ["cut.png", "text.jpg", "zero.png"]
    for failure in report["failed"]:
        assert failure["error"].startswith(failure["file"] + ":") and "\n" not in failure["error"]
    assert all(name in result.stderr for name in ("cut.png", "text.jpg", "zero.png"))


def test_a_write_error_stops_the_run_with_one_line(model_path: Path, images: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sub").write_text("a file where the output folder should be")
    result = invoke("encode", model_path, images, "--out", tmp_path / "out", "--device", "cpu", "--num-workers", "1")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "cannot write the token file" in lines[0]


def test_encode_leaves_the_callers_rng_and_threads_alone(model_path: Path, images: Path, tmp_path: Path) -> None:
    torch.manual_seed(123)
    load(model_path)  # building the model draws its (then overwritten) initial weights; nothing else may draw
    expected = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    encode_files(model_path, [images], tmp_path, device="cpu", num_workers=2)
    assert torch.equal(torch.rand(3), expected) and torch.get_num_threads() == threads


@pytest.fixture
def sounds(sample_audio: Path, tmp_path: Path) -> Path:
    """5 FSDD WAVs, one in a subfolder."""
    src = tmp_path / "audio"
    (src / "sub").mkdir(parents=True)
    for i, path in enumerate(sorted(sample_audio.glob("*.wav"))[:5]):
        shutil.copy(path, (src / "sub" if i == 3 else src) / path.name)
    return src


def test_audio_parts_together_equal_a_whole_run(audio_model: Path, sounds: Path, tmp_path: Path) -> None:
    encode_files(audio_model, [sounds], tmp_path / "whole", device="cpu")
    for i in (1, 2):
        report = encode_files(audio_model, [sounds], tmp_path / "parts", device="cpu", part=(i, 2))
        assert len(report.written) == [2, 3][i - 1]
    assert tree(tmp_path / "parts") == tree(tmp_path / "whole")


@pytest.mark.parametrize("shard", [False, True])
def test_audio_outputs_do_not_depend_on_workers(audio_model: Path, sounds: Path, tmp_path: Path,
                                                shard: bool) -> None:
    """Workers encode a file each on one thread; with 0 workers this process encodes on two: the same codes,
    and a file that is not audio is reported while the others are written."""
    (sounds / "broken.wav").write_bytes(b"RIFF not really")
    outputs = []
    threads = torch.get_num_threads()
    for workers in (0, 1, 2):
        torch.set_num_threads(2 if workers == 0 else 1)
        try:
            report = encode_files(audio_model, [sounds], tmp_path / str(workers), device="cpu",
                                  num_workers=workers, shard=shard, codec="entropy")
        finally:
            torch.set_num_threads(threads)
        assert [Path(path).name for path, _ in report.failed] == ["broken.wav"]
        assert "broken.wav" in report.failed[0][1]
        assert report.tokens == sum(2 * math.ceil(data.audio_info(p)[1] / 8)
                                    for p in sounds.rglob("*.wav") if p.name != "broken.wav")
        outputs.append(tree(tmp_path / str(workers)))
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) == (4 if shard else 5)


def test_shape_batches_hold_a_bounded_number_of_images() -> None:
    """A folder where every image has its own shape: batches go out before the folder is read to the end."""
    batch_size, consumed = 4, []

    def chunks():
        for start in range(0, 200, 8):
            consumed.append(start)
            groups = [ShapeGroup([i], [(4, 4 + i)], np.zeros((1, 3, 4, 4 + i), np.uint8))
                      for i in range(start, start + 8)]
            yield Chunk(groups, [])

    batches = shape_batches(chunks(), batch_size, lambda i, why: None)
    first_items, _ = next(batches)
    assert first_items == [(0, (4, 4))]
    assert len(consumed) * 8 <= PENDING_BATCHES * batch_size + 8
    rest = [items for items, _ in batches]
    assert sorted(i for items in [first_items, *rest] for i, _ in items) == list(range(200))


def test_shape_batches_respect_the_pixel_budget() -> None:
    groups = [ShapeGroup(list(range(10)), [(8, 8)] * 10, np.zeros((10, 3, 8, 8), np.uint8)),
              ShapeGroup([10], [(64, 64)], np.zeros((1, 3, 64, 64), np.uint8))]
    batches = list(shape_batches(iter([Chunk(groups, [(11, "bad")])]), 8, lambda i, why: None, batch_pixels=256))
    assert [len(items) for items, _ in batches] == [4, 4, 1, 2]
    assert all(math.prod(b.shape[-2:]) * len(b) <= 256 for _, b in batches[:2])


def test_ordered_writer_writes_in_order_and_raises_the_writers_error() -> None:
    written: list[int] = []
    with OrderedWriter(lambda i, codes, extra: written.append(i), lambda i, why: written.append(-i)) as writer:
        writer.put([(2, {}), (3, {})], torch.zeros(2, 1, 1))
        writer.fail(1, "bad")
        writer.put([(0, {})], torch.zeros(1, 1, 1))
    assert written == [0, -1, 2, 3]

    def broken(i: int, codes: np.ndarray, extra: dict) -> None:
        raise VqtokError("disk full")

    with pytest.raises(VqtokError, match="disk full"):
        with OrderedWriter(broken, lambda i, why: None, depth=1) as writer:
            for i in range(50):  # more than the queue holds: a failed writer must not leave put() blocked
                writer.put([(i, {})], torch.zeros(1, 1, 1))
