"""data.prepare end to end, with tiny randomly initialised encoders saved locally (nothing is downloaded).

Expected shapes come from the encoders' configs by hand: the image VAE halves each side twice
(spatial factor 4), the video VAE also halves time once (temporal factor 2); with patch 2, sides are
cropped to multiples of 8. Text lengths are word counts: the tokenizer splits on whitespace and adds
no special tokens.
"""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
av = pytest.importorskip("av")

from PIL import Image  # noqa: E402

from data.prepare import PrepareConfig, build_parser, main, prepare  # noqa: E402
from dit.encoders import VaeEncoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
WORDS = "a red green blue square circle video of and twice".split()
SHIFT, SCALE = 0.1, 0.5  # image VAE normalisation: (z - shift) * scale
MEAN, STD = 0.2, 2.0  # video VAE normalisation: (z - mean) / std


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Save a tiny image VAE, video VAE and T5 encoder + tokenizer; return their folders."""
    from diffusers import AutoencoderKL, AutoencoderKLWan
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        shift_factor=SHIFT,
        scaling_factor=SCALE,
    ).save_pretrained(root / "vae")
    AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        scale_factor_temporal=2,
        scale_factor_spatial=4,
        latents_mean=[MEAN] * 4,
        latents_std=[STD] * 4,
    ).save_pretrained(root / "video_vae")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(root / "t5")
    T5EncoderModel(
        T5Config(vocab_size=len(vocab), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    ).save_pretrained(root / "t5")
    return {"vae": root / "vae", "video_vae": root / "video_vae", "t5": root / "t5"}


def _image(path: Path, height: int, width: int, caption: str | None, seed: int = 0) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def _video(path: Path, frames: int, height: int, width: int, fps: int, caption: str) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 20 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    path.with_suffix(".txt").write_text(caption)


def _argv(inp: Path, out: Path, models: dict[str, Path], *extra: str, vae: str = "vae") -> list[str]:
    return [
        str(inp),
        str(out),
        "--vae",
        str(models[vae]),
        "--text-encoder",
        str(models["t5"]),
        "--num-workers",
        "2",
        *extra,
    ]


def _run(argv: list[str]):
    return prepare(PrepareConfig(**vars(build_parser().parse_args(argv))))


def _read_shard(path: Path) -> dict[str, dict]:
    """``{key: {"pth": tensor, "pickle": object, "json": dict}}`` straight from the tar."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            payload = tar.extractfile(member).read()
            value = {"pth": lambda b: torch.load(io.BytesIO(b)), "pickle": pickle.loads, "json": json.loads}[ext](
                payload
            )
            samples.setdefault(key.removeprefix("samples/"), {})[ext] = value
    return samples


def _read_all(out: Path) -> dict[str, dict]:
    return {k: v for shard in sorted(out.glob("shard_*.tar")) for k, v in _read_shard(shard).items()}


def _energon_keys(out: Path) -> list[str]:
    """Keys of every sample energon's CrudeWebdataset loader yields in one pass."""
    from megatron.energon import Cooker, DefaultTaskEncoder, WorkerConfig, get_loader, get_train_dataset, stateless

    @stateless
    def cook(sample: dict) -> dict:
        return sample

    class Reader(DefaultTaskEncoder):
        cookers = [Cooker(cook)]

    dataset = get_train_dataset(
        out,
        worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
        batch_size=None,
        shuffle_buffer_size=None,
        max_samples_per_sequence=None,
        task_encoder=Reader(),
        repeat=False,
    )
    keys = []
    for sample in get_loader(dataset):
        assert isinstance(sample["pth"], torch.Tensor) and isinstance(sample["json"], dict)
        keys.append(sample["__key__"].removeprefix("samples/"))
    return sorted(keys)


def _pixels(path: Path) -> torch.Tensor:
    """``[1, 3, H, W]`` in [-1, 1], as the VAE sees a PNG."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 127.5 - 1


@pytest.fixture(scope="module")
def mixed(models, tmp_path_factory) -> tuple[Path, Path, object]:
    """Images of two sizes, a video, a broken image and an uncaptioned one; the image VAE; 2 per shard."""
    inp, out = tmp_path_factory.mktemp("mixed_in"), tmp_path_factory.mktemp("mixed") / "out"
    _image(inp / "a.png", 40, 56, "a red square")  # position 0
    (inp / "b.png").write_bytes(b"not an image")  # position 1: broken
    (inp / "b.txt").write_text("broken")
    _image(inp / "c.png", 45, 30, "blue circle of green and a red square twice")  # position 2
    _video(inp / "clip.mp4", 9, 32, 48, 24, "video of a square")  # position 3
    _image(inp / "e.png", 16, 16, None)  # no caption: not an input
    summary = _run(_argv(inp, out, models, "--samples-per-shard", "2", "--max-text-length", "6"))
    return inp, out, summary


@pytest.mark.slow
def test_shards_hold_the_format(mixed):
    _, out, _ = mixed
    assert sorted(p.name for p in out.glob("shard_*.tar")) == ["shard_000000.tar", "shard_000001.tar"]
    assert list(_read_shard(out / "shard_000000.tar")) == ["sample_0000000"]  # its other input is broken
    samples = _read_all(out)
    assert sorted(samples) == ["sample_0000000", "sample_0000002", "sample_0000003"]
    # latent: [C, H/4, W/4] for images (45x30 is cropped to 40x24), [C, T, H/4, W/4] per frame for the video
    expected = {
        "sample_0000000": (
            (4, 10, 14),
            3,
            {"caption": "a red square", "height": 40, "width": 56, "aspect_ratio": 1.4, "source": "a.png"},
        ),
        "sample_0000002": (
            (4, 10, 6),
            6,
            {
                "caption": "blue circle of green and a red square twice",
                "height": 40,
                "width": 24,
                "aspect_ratio": 0.6,
                "source": "c.png",
            },
        ),
        "sample_0000003": (
            (4, 9, 8, 12),
            4,
            {
                "caption": "video of a square",
                "height": 32,
                "width": 48,
                "aspect_ratio": 1.5,
                "source": "clip.mp4",
                "fps": 24.0,
                "num_frames": 9,
            },
        ),
    }
    for key, (latent_shape, text_length, meta) in expected.items():
        sample = samples[key]
        assert tuple(sample["pth"].shape) == latent_shape and sample["pth"].dtype == torch.bfloat16
        # 9 words truncated to --max-text-length 6; no padding token is kept
        assert tuple(sample["pickle"].shape) == (text_length, 16) and sample["pickle"].dtype == torch.bfloat16
        assert sample["json"] == meta


def test_latent_and_text_values_match_the_encoders(mixed, models):
    """The stored latent is the VAE posterior mean, normalised; the text is the encoder run on the caption alone."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, T5EncoderModel

    inp, out, _ = mixed
    sample = _read_all(out)["sample_0000000"]
    with torch.no_grad():
        z = AutoencoderKL.from_pretrained(models["vae"]).encode(_pixels(inp / "a.png")).latent_dist.mean[0]
        tokens = AutoTokenizer.from_pretrained(models["t5"])("a red square", return_tensors="pt")
        text = T5EncoderModel.from_pretrained(models["t5"])(**tokens).last_hidden_state[0]
    # bf16 storage keeps ~3 significant digits
    torch.testing.assert_close(sample["pth"].float(), (z - SHIFT) * SCALE, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(sample["pickle"].float(), text, rtol=1e-2, atol=1e-2)


def test_energon_reads_every_sample(mixed):
    _, out, _ = mixed
    assert (out / ".nv-meta" / "dataset.yaml").is_file()
    assert _energon_keys(out) == ["sample_0000000", "sample_0000002", "sample_0000003"]


def test_broken_and_uncaptioned_inputs_are_counted(mixed):
    _, _, summary = mixed
    assert dict(summary.skipped) == {"unreadable": 1, "no caption": 1}
    assert summary.samples_written == 3 and summary.shards_written == 2
    assert any(example.startswith("b.png (unreadable") for example in summary.examples)


@pytest.mark.slow
def test_video_vae_compresses_time(models, tmp_path):
    """12 frames at 24 fps -> --fps 12 keeps 6 -> a causal 2x VAE takes 1 + 2k, so 5 -> 3 latent frames."""
    from diffusers import AutoencoderKLWan

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    _image(inp / "a.png", 40, 56, "a red square")
    _video(inp / "v.mp4", 12, 32, 48, 24, "video of a circle")
    _run(_argv(inp, out, models, "--fps", "12", vae="video_vae"))
    samples = _read_all(out)
    image, video = samples["sample_0000000"], samples["sample_0000001"]
    assert tuple(video["pth"].shape) == (4, 3, 8, 12)
    assert video["json"]["fps"] == 12.0 and video["json"]["num_frames"] == 5
    assert tuple(image["pth"].shape) == (4, 10, 14)  # an image through a video VAE is still [C, H, W]
    with torch.no_grad():
        vae = AutoencoderKLWan.from_pretrained(models["video_vae"])
        z = vae.encode(_pixels(inp / "a.png")[:, :, None]).latent_dist.mean[0, :, 0]
    torch.testing.assert_close(image["pth"].float(), (z - MEAN) / STD, rtol=1e-2, atol=1e-2)


@pytest.mark.slow  # 40-85 s in the one-process tier on the loaded 2-core machine
def test_resume_writes_only_missing_shards(models, tmp_path, monkeypatch, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for i, word in enumerate(["red", "green", "blue", "video"]):
        _image(inp / f"{i}.png", 16, 16, f"a {word} square", seed=i)
    argv = _argv(inp, out, models, "--samples-per-shard", "2", "--batch-size", "1")

    # Crash while encoding the 4th input (the second of shard 1): shard 0 is complete, shard 1 is not.
    encode, calls = VaeEncoder.encode, []

    def crash_on_fourth(self, clips):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated crash")
        return encode(self, clips)

    monkeypatch.setattr(VaeEncoder, "encode", crash_on_fourth)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(argv)
    monkeypatch.setattr(VaeEncoder, "encode", encode)
    assert (out / "shard_000000.tar").is_file() and not (out / "shard_000001.tar").exists()
    assert (out / "shard_000001.tar.partial").is_file()  # half written, and not taken for complete

    summary = _run(argv)
    assert (summary.shards_done_before, summary.shards_written, summary.samples_written) == (1, 1, 2)
    assert not list(out.glob("*.partial"))
    assert _energon_keys(out) == [f"sample_{i:07d}" for i in range(4)]

    # Delete shard 0: only it is rewritten, identically; shard 1 is left alone.
    before = _read_shard(out / "shard_000000.tar")
    kept = out / "shard_000001.tar"
    kept_stat, kept_bytes = kept.stat().st_mtime_ns, kept.read_bytes()
    (out / "shard_000000.tar").unlink()
    summary = _run(argv)
    assert (summary.shards_done_before, summary.shards_written) == (1, 1)
    assert kept.stat().st_mtime_ns == kept_stat and kept.read_bytes() == kept_bytes
    after = _read_shard(out / "shard_000000.tar")
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(after[key]["pth"], before[key]["pth"]) and after[key]["json"] == before[key]["json"]

    # Complete: nothing is encoded (the encoders are not even loaded).
    monkeypatch.setattr("data.prepare._load_encoders", lambda config: pytest.fail("loaded encoders"))
    assert _run(argv).shards_written == 0

    # Other settings on the same folder would mix two datasets: refused.
    capsys.readouterr()
    assert main(argv + ["--samples-per-shard", "3"]) == 2
    err = capsys.readouterr().err
    assert "error: OUT:" in err and "other samples_per_shard;" in err


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_caption_list(models, tmp_path, suffix):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    _image(inp / "a.png", 16, 24, None)
    _image(inp / "c.png", 24, 16, None)
    rows = [("a.png", "a red, square"), ("missing.png", "nothing"), (str(inp / "c.png"), "green circle")]
    if suffix == ".csv":
        text = "path,caption\n" + "".join(f'{p},"{c}"\n' for p, c in rows)
    else:
        text = "".join(json.dumps({"path": p, "caption": c}) + "\n" for p, c in rows)
    (tmp_path / f"captions{suffix}").write_text(text)
    summary = _run(_argv(inp, out, models, "--captions", str(tmp_path / f"captions{suffix}")))
    samples = _read_all(out)
    assert sorted(samples) == ["sample_0000000", "sample_0000002"]
    assert samples["sample_0000000"]["json"]["caption"] == "a red, square"
    assert samples["sample_0000000"]["pickle"].shape[0] == 3  # "red," is one (unknown) word
    assert tuple(samples["sample_0000002"]["pth"].shape) == (4, 6, 4)
    assert dict(summary.skipped) == {"unreadable": 1}


def _captioned(t: Path) -> str:
    inp = t / "in"
    inp.mkdir(exist_ok=True)
    _image(inp / "a.png", 16, 16, "a red square")
    return str(inp)


def _headerless_csv(t: Path) -> list[str]:
    (t / "c.csv").write_text("a.png,a red square\n")
    return [_captioned(t), "--captions", str(t / "c.csv")]


USER_ERRORS = {  # case: (INPUT and the flags that differ from a good run, the start of the one-line error)
    "missing input folder": (lambda t: [str(t / "nowhere")], "INPUT: "),
    "missing caption list": (lambda t: [_captioned(t), "--captions", str(t / "none.csv")], "--captions: "),
    "csv without header": (_headerless_csv, "--captions: "),
    "bad shard size": (lambda t: [_captioned(t), "--samples-per-shard", "0"], "--samples-per-shard: "),
    "unknown vae path": (lambda t: [_captioned(t), "--vae", str(t / "no_vae")], "--vae: "),
    "unknown text encoder path": (
        lambda t: [_captioned(t), "--text-encoder", "./no/t5"],
        "--text-encoder: ./no/t5 does",
    ),
    "not a text encoder folder": (lambda t: [_captioned(t), "--text-encoder", str(t)], "--text-encoder: cannot load"),
}


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_user_mistakes_are_one_line(case, models, tmp_path, capsys):
    build, expected = USER_ERRORS[case]
    argv = build(tmp_path)
    argv = _argv(Path(argv[0]), tmp_path / "out", models) + argv[1:]  # later flags override the defaults
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"data.prepare: error: {expected}"), err


def test_uncaptioned_folder_is_a_user_error(models, tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    _image(inp / "a.png", 16, 16, None)
    assert main(_argv(inp, tmp_path / "out", models)) == 2
    assert "no caption .txt beside any" in capsys.readouterr().err


@pytest.mark.slow
def test_command_line_exit_code(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "data.prepare",
            str(tmp_path / "nowhere"),
            str(tmp_path / "out"),
            "--vae",
            "x",
            "--text-encoder",
            "y",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"data.prepare: error: INPUT: {tmp_path / 'nowhere'} is not a folder; "
        "give the folder that holds the images/videos"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("vae, frames", [("vae", 1), ("video_vae", 3)])
def test_vae_decode_for_sampling(models, tmp_path, vae, frames):
    """VaeEncoder.decode undoes the normalisation and decodes as diffusers does; dit.generate writes the
    decoded samples as PNG images or MP4 videos of the right size."""
    from diffusers import AutoModel

    from dit.encoders import VaeEncoder
    from dit.generate import build_parser, options
    from dit.inference import decode_to_files

    latents = torch.randn(2, 4, frames, 4, 6, generator=torch.Generator().manual_seed(0))
    pixels = VaeEncoder(str(models[vae])).decode(latents)  # [N, T, 3, H, W] uint8
    reference = AutoModel.from_pretrained(str(models[vae]))
    if vae == "vae":
        z = latents[:, :, 0] / SCALE + SHIFT
        expected = reference.decode(z).sample[:, None]  # [N, 1, 3, H, W]
    else:
        expected = reference.decode(latents * STD + MEAN).sample.transpose(1, 2)  # [N, T, 3, H, W]
    expected = ((expected.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert pixels.shape == expected.shape and (pixels.int() - expected.int()).abs().max() <= 1
    flags = ["--load", "x", "--latent-shape", "4,4,6", "--output", str(tmp_path / "s.pt"), "--fps", "8"]
    files = decode_to_files(options(build_parser().parse_args([*flags, "--vae", str(models[vae])])), latents)
    assert len(files) == 2
    if frames == 1:
        assert files[0].endswith(".png") and Image.open(files[0]).size == (pixels.shape[-1], pixels.shape[-2])
    else:
        with av.open(files[0]) as container:
            decoded = list(container.decode(video=0))
        assert files[0].endswith(".mp4") and len(decoded) == pixels.shape[1]
        assert (decoded[0].height, decoded[0].width) == tuple(pixels.shape[-2:])
