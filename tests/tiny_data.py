"""Tiny datasets in the real on-disk format (shards written by data.shards, indexed by `energon prepare`).

Latents have 4 channels and patch 2, text embeddings width 8: an image ``[4, 4, 6]`` is 6 tokens,
a video ``[4, 3, 4, 4]`` 12. Payloads are built by hand so that tests can break them on purpose.
"""

from __future__ import annotations

import codecs
import io
import json
import os
import pickle
import random
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data import shards
from data.loader.bad_data import SkipKind
from data.loader.dataloader import DiTDataLoader, build_task_encoder, energon_loader
from data.loader.rank_split import RankPlace
from data.loader.sample import LatentFormat
from data.shards import ShardSample, encode_sample

FMT = LatentFormat(patch_size=2, temporal_patch_size=1, latent_channels=4, text_embed_dim=8)

DATA_FLAGS = ["--max-seq-length", "32", "--patch-size", "2", "--latent-channels", "4", "--text-embed-dim", "8"]
DATA_FLAGS += ["--packing-buffer-size", "6"]
"""The command line of FMT: packs of 32 tokens from a buffer of 6 samples."""
FLAGS = [*DATA_FLAGS, "--micro-batch-size", "3"]  # for tiny_loader, whose tests pack or not

Entry = tuple[str, dict[str, bytes]]

DEBUG_MODEL = ["--model-size", "DiT-debug", "--latent-channels", "4", "--text-embed-dim", "8"]
DEBUG_LAUNCH = [*DEBUG_MODEL, "--max-seq-length", "32", "--num-workers", "0"]
"""The DiT-debug model on these datasets, loaded in the main process: a launch the checks pass."""

# pretrain_dit.py flags of the DiT-debug size (dit/model/sizes.py) for these datasets;
# tests add their own after these (argparse keeps the last value)
TINY_RUN = [*DEBUG_LAUNCH, "--patch-size", "2", "--packing-buffer-size", "8", "--transformer-impl", "local"]
TINY_RUN += ["--log-interval", "1"]


def payloads(
    shape: tuple[int, ...],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    text_len: int = 3,
    text: Any = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, bytes]:
    """The three members of one sample; the text embedding defaults to numpy float32 ``[text_len, 8]``."""
    g = torch.Generator().manual_seed(seed)
    if text is None:
        text = np.random.default_rng(seed).standard_normal((text_len, FMT.text_embed_dim)).astype(np.float32)
    metadata = {"caption": f"sample {seed}", "height": 8 * shape[-2], "width": 8 * shape[-1]} if meta is None else meta
    return encode_sample(ShardSample(torch.randn(shape, generator=g).to(dtype), text, metadata))


def good_entries(n: int, seed: int = 0, prefix: str = "good", fps: float | None = None) -> list[Entry]:
    """Mixed images and videos of 4 to 24 tokens, a few dtypes; the videos' metadata with ``fps`` where given."""
    rng = random.Random(seed)
    entries = []
    for i in range(n):
        h, w = 2 * rng.randint(1, 3), 2 * rng.randint(1, 4)
        shape = (4, rng.randint(1, 2), h, w) if rng.random() < 0.4 else (4, h, w)
        dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
        meta = (
            {"caption": f"sample {i}", "height": 8 * h, "width": 8 * w, "fps": fps} if fps and len(shape) == 4 else None
        )
        entries.append(
            (
                f"{prefix}_{i:04d}",
                payloads(shape, seed=seed * 1000 + i, dtype=dtype, meta=meta, text_len=rng.randint(1, 5)),
            )
        )
    return entries


def tiny_loader(
    path,
    *extra: str,
    workers: int = 0,
    repeat: bool = True,
    max_bad: float = 1.0,
    reject_oversize: bool = False,
    stall_samples: int = 1000,
) -> DiTDataLoader:
    """The training loader over a tiny dataset (max 32 tokens, buffer 6, pad multiple 4), on one rank."""
    from dit.training.arguments import load_run_config

    run = load_run_config([*FLAGS, *extra], need_data=False)
    loader = energon_loader(
        path,
        build_task_encoder(run.model, run.data, pad_multiple=4),
        RankPlace(),
        num_workers=workers,
        seed=3,
        packing_buffer_size=run.data.packing_buffer_size,
        micro_batch_size=run.training.micro_batch_size,
        repeat=repeat,
    )
    return DiTDataLoader(
        loader,
        RankPlace(),
        max_bad_sample_fraction=max_bad,
        num_workers=workers,
        buffer_size=run.data.buffer_samples,
        reject_oversize=reject_oversize,
        stall_samples=stall_samples,
    )


def write_dataset(root: Path, entries: list[Entry], per_shard: int = 8) -> Path:
    shards.write_dataset(root, entries, per_shard)
    return root


def crude(files: dict[str, bytes], key: str = "samples/x", shard: str = "shard_000000.tar") -> dict[str, Any]:
    """A crude sample as energon hands it to the cooker (decoder off: raw bytes)."""
    return {
        "__key__": key,
        "__shard__": shard,
        "__restore_key__": ("Webdataset", 0),
        "__subflavors__": None,
        "__sources__": (),
        **files,
    }


def torch_bytes(value: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def with_members(**members: bytes | None) -> dict[str, bytes]:
    """A good image sample ``[4, 2, 4]`` with members replaced (bytes) or removed (None)."""
    files = payloads((4, 2, 4))
    for ext, payload in members.items():
        if payload is None:
            files.pop(ext)
        else:
            files[ext] = payload
    return files


# every defect the loader must skip, with the kind it is counted as
DEFECTS: dict[str, tuple[dict[str, bytes], SkipKind]] = {
    "truncated .pth": (with_members(pth=payloads((4, 2, 4))["pth"][:300]), SkipKind.CORRUPT_MEMBER),
    "garbage .pickle": (with_members(pickle=b"\x80\x05garbage"), SkipKind.CORRUPT_MEMBER),
    ".pth holds a dict": (with_members(pth=torch_bytes({"latent": torch.zeros(4, 2, 4)})), SkipKind.NOT_A_LATENT),
    ".pth of rank 2": (with_members(pth=torch_bytes(torch.zeros(4, 4))), SkipKind.NOT_A_LATENT),
    ".pth of ints": (with_members(pth=torch_bytes(torch.zeros(4, 2, 4, dtype=torch.int64))), SkipKind.NOT_A_LATENT),
    "image with a zero-sized side": (with_members(pth=torch_bytes(torch.zeros(4, 0, 4))), SkipKind.NOT_A_LATENT),
    "video of zero frames": (with_members(pth=torch_bytes(torch.zeros(4, 0, 2, 4))), SkipKind.NOT_A_LATENT),
    "wrong channel count": (with_members(pth=torch_bytes(torch.zeros(3, 2, 4))), SkipKind.NOT_A_LATENT),
    "NaN in latent": (
        with_members(pth=torch_bytes(torch.tensor([float("nan")]).expand(4, 2, 4).clone())),
        SkipKind.NON_FINITE,
    ),
    "Inf in text": (with_members(pickle=pickle.dumps(np.full((2, 8), np.inf, np.float32))), SkipKind.NON_FINITE),
    "missing .pickle": (with_members(pickle=None), SkipKind.MISSING_MEMBER),
    "missing .json": (with_members(json=None), SkipKind.MISSING_MEMBER),
    "invalid JSON": (with_members(json=b"{caption: oops"), SkipKind.INVALID_JSON),
    "JSON that is a list": (with_members(json=b'["caption", "c"]'), SkipKind.INVALID_JSON),
    "fps as text": (with_members(json=b'{"caption": "c", "fps": "24"}'), SkipKind.INVALID_JSON),
    "text width 7": (with_members(pickle=pickle.dumps(np.zeros((3, 7), np.float32))), SkipKind.BAD_TEXT_EMBEDDING),
    "text of rank 1": (with_members(pickle=pickle.dumps(np.zeros(8, np.float32))), SkipKind.BAD_TEXT_EMBEDDING),
    "text as a list": (with_members(pickle=pickle.dumps([[0.0] * 8])), SkipKind.BAD_TEXT_EMBEDDING),
    "odd latent width": (with_members(pth=torch_bytes(torch.zeros(4, 2, 5))), SkipKind.GRID_NOT_DIVISIBLE),
    "longer than max": (with_members(pth=torch_bytes(torch.zeros(4, 3, 8, 8))), SkipKind.OVERSIZE),  # 48 > 32
}


GOOD = 30  # good samples in the mixed dataset


def cut_shard(path: Path, keep: float = 0.5) -> list[str]:
    """Cut a shard file short after ``energon prepare`` indexed it (storage corruption), as a
    reviewer did by hand; return the names of its samples that lost a byte of a member or header."""
    data = path.read_bytes()
    cut = int(len(data) * keep)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    lost = {m.name.rsplit(".", 1)[0] for m in members if m.offset_data + m.size > cut}
    path.write_bytes(data[:cut])
    return sorted(name.rsplit("/", 1)[-1] for name in lost)


TRUNCATED_GOOD = 24  # good samples in the dataset with a shard cut short


class RunsCommand:
    """Pickles to a call of ``os.system(command)``: what a crafted shard's ``.pickle`` can hold."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class RunsCodeThenReturnsArray:
    """Pickles to code that touches ``marker``, then returns a valid text embedding (trained by plain pickle)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (
            f"__import__('pathlib').Path({str(self.marker)!r}).touch() or __import__('numpy').zeros((3, 8), 'float32')",
        )


class StorageRunsCommand:
    """Pickles like a torch tensor's storage (``torch.storage._load_from_bytes``), whose torch.save bytes
    hold a command: plain pickle hands them to ``torch.load(weights_only=False)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return torch.storage._load_from_bytes, (torch_bytes(RunsCommand(self.command)),)


def saved_on(tensor: torch.Tensor, device: str) -> bytes:
    """``torch.save`` bytes of ``tensor`` as if it had been saved from ``device`` (a GPU we do not have)."""
    src = zipfile.ZipFile(io.BytesIO(torch_bytes(tensor)))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):  # the storage's location, a pickled str
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X" + len(device).to_bytes(4, "little") + device.encode())
            dst.writestr(info, data)
    return out.getvalue()


class Calls:
    """Pickles to ``function(*args)``: a call through a global the unpickler may or may not admit."""

    def __init__(self, function: Any, *args: Any):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def deflate_bomb(megabytes: int) -> bytes:
    """A text embedding pickled as a torch tensor whose storage bytes are a torch.save archive with its data
    entry deflated: ``megabytes`` of zeros in a few kilobytes."""
    n = megabytes * 2**20 // 4
    src = zipfile.ZipFile(io.BytesIO(torch_bytes(torch.zeros(n))))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), zipfile.ZIP_DEFLATED)
    storage = Calls(torch.storage._load_from_bytes, out.getvalue())
    from collections import OrderedDict

    return pickle.dumps(Calls(torch._utils._rebuild_tensor_v2, storage, 0, (n // 8, 8), (8, 1), False, OrderedDict()))


def sparse_header(name: str, stored: bytes, declared: int) -> bytes:
    """A GNU sparse tar member ``name`` whose header declares ``declared`` bytes (a hole, then ``stored``):
    tarfile reads it as ``declared`` bytes, holes as zeros, allocated in full."""
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mtime = len(stored), tarfile.GNUTYPE_SPARSE, 0
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))  # one 512-byte block for a short name
    header[386:410] = tarfile.itn(declared - len(stored), 12, tarfile.GNU_FORMAT) + tarfile.itn(
        len(stored), 12, tarfile.GNU_FORMAT
    )
    header[482] = 0  # no extended sparse headers
    header[483:495] = tarfile.itn(declared, 12, tarfile.GNU_FORMAT)  # the size a reader allocates
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header) + stored + b"\0" * (-len(stored) % 512)


def write_shard_with_sparse_member(path: Path, entries: list[Entry], key: str, ext: str, declared: int) -> None:
    """A shard of ``entries`` in which sample ``key``'s ``ext`` member is :func:`sparse_header`'s, declaring
    ``declared`` bytes."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, files in entries:
            for member_ext, payload in files.items():
                if (name, member_ext) == (key, ext):
                    raw = sparse_header(f"samples/{name}.{ext}", payload, declared)
                    tar.fileobj.write(raw)
                    tar.offset += len(raw)
                else:
                    info = tarfile.TarInfo(f"samples/{name}.{member_ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


HOSTILE_FMT = replace(FMT, fps_conditioning=True, max_text_length=6)
HOSTILE_FLAGS = ["--fps-conditioning", "--max-text-length", "6"]  # the command line of HOSTILE_FMT


def hostile(markers: Path) -> dict[str, tuple[dict[str, bytes], SkipKind | None]]:
    """Hostile and unusual samples, each with the kind it is skipped as (None: it trains). The code
    in the pickles would create files in ``markers``."""

    def shell(name: str) -> str:
        return f"touch {markers / name}"

    meta = json.loads(payloads((4, 2, 4))["json"])
    latent = torch.randn(4, 2, 4)
    return {
        "pickle that runs a command": (
            with_members(pickle=pickle.dumps(RunsCommand(shell("system")))),
            SkipKind.UNSAFE_PICKLE,
        ),
        "pickle that runs code, then returns a good array": (
            with_members(pickle=pickle.dumps(RunsCodeThenReturnsArray(markers / "eval"))),
            SkipKind.UNSAFE_PICKLE,
        ),
        "tensor pickle whose storage bytes run a command": (
            with_members(pickle=pickle.dumps(StorageRunsCommand(shell("storage")))),
            SkipKind.CORRUPT_MEMBER,
        ),
        "JSON nested 100000 deep": (
            with_members(json=b'{"caption": "c", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
            SkipKind.INVALID_JSON,
        ),
        "sparse latent": (with_members(pth=torch_bytes(latent.to_sparse())), SkipKind.NOT_A_LATENT),
        "meta-device latent (no data)": (
            with_members(pth=torch_bytes(torch.empty(4, 2, 4, device="meta"))),
            SkipKind.SAMPLE_ERROR,
        ),
        "latent viewing a 100x larger storage": (
            with_members(pth=torch_bytes(torch.randn(3200)[:32].view(4, 2, 4))),
            SkipKind.OVERSIZED_STORAGE,
        ),
        "text viewing a larger storage": (
            with_members(pickle=pickle.dumps(torch.randn(100, 8)[:3])),
            SkipKind.OVERSIZED_STORAGE,
        ),
        "NaN fps": (with_members(json=json.dumps({**meta, "fps": float("nan")}).encode()), SkipKind.BAD_METADATA),
        "negative fps": (with_members(json=json.dumps({**meta, "fps": -24}).encode()), SkipKind.BAD_METADATA),
        "text longer than --max-text-length": (
            with_members(pickle=pickle.dumps(np.ones((7, 8), np.float32))),
            SkipKind.TEXT_OVERSIZE,
        ),
        "video without fps (--fps-conditioning)": (
            with_members(pth=torch_bytes(torch.randn(4, 3, 2, 4))),
            SkipKind.MISSING_FPS,
        ),
        "float64 text beyond float32's range": (
            with_members(pickle=pickle.dumps(np.full((2, 8), 1e300))),
            SkipKind.NON_FINITE,
        ),
        "punycode in the unpickler (minutes of CPU)": (
            with_members(pickle=pickle.dumps(Calls(codecs.encode, "\u00e9" * 8000, "punycode"))),
            SkipKind.UNSAFE_PICKLE,
        ),
        "deflate bomb in the text embedding": (with_members(pickle=deflate_bomb(16)), SkipKind.OVERSIZED_STORAGE),
        "a dict .pickle without the text's key": (
            with_members(pickle=pickle.dumps({"t5": np.ones((2, 8), np.float32)})),
            SkipKind.BAD_TEXT_EMBEDDING,
        ),
        # unusual but sound: these train
        "latent saved with requires_grad": (
            with_members(pth=torch_bytes(torch.randn(4, 2, 4, requires_grad=True))),
            None,
        ),
        "text saved with requires_grad": (
            with_members(pickle=pickle.dumps(torch.randn(3, 8, dtype=torch.bfloat16, requires_grad=True))),
            None,
        ),
        "big-endian float32 text": (with_members(pickle=pickle.dumps(np.ones((2, 8), ">f4"))), None),
        "float128 text": (with_members(pickle=pickle.dumps(np.ones((2, 8), np.longdouble))), None),
        "fewer frames than the latent (the latent's shape is the truth)": (
            with_members(
                pth=torch_bytes(torch.randn(4, 3, 2, 4)), json=json.dumps({**meta, "num_frames": 2, "fps": 8}).encode()
            ),
            None,
        ),
        "height below the latent's": (with_members(json=json.dumps({**meta, "height": 1}).encode()), None),
        "latent saved on a GPU": (with_members(pth=saved_on(latent, "cuda:0")), None),
        "transposed latent": (with_members(pth=torch_bytes(torch.randn(4, 4, 2).transpose(1, 2))), None),
        "expanded latent (stride 0)": (with_members(pth=torch_bytes(torch.randn(4, 1, 4).expand(4, 2, 4))), None),
        "protocol 2 numpy text, 24 fps video": (
            with_members(
                pickle=pickle.dumps(np.ones((2, 8), np.float16), protocol=2),
                json=json.dumps({**meta, "fps": 24, "num_frames": 1}).encode(),
            ),
            None,
        ),
    }
