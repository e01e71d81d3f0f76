"""The cooker and the decoder on every format variant, and each defect named by its kind."""

import io
import json
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

from data.loader.bad_data import BadSample, SkipKind
from data.loader.sample import DiffusionSample, EncodedSample, SkippedSample
from data.loader.task_encoder import DiTTaskEncoder
from dit.model.patchify import patchify
from tests.tiny_data import DEFECTS, FMT, crude, payloads, torch_bytes, with_members

ENCODER = DiTTaskEncoder(FMT, max_seq_length=32, pad_multiple=4)
CLASS_ENCODER = DiTTaskEncoder(replace(FMT, num_classes=10), max_seq_length=32, pad_multiple=4)  # --conditioning class


def cook_and_decode(files, encoder=ENCODER):
    cooked = encoder.cook(crude(files))
    return cooked, (encoder.postencode_sample(cooked) if isinstance(cooked, DiffusionSample) else cooked)


VARIANTS = {
    "video fp32 [C,T,H,W], numpy fp32 text": dict(shape=(4, 3, 4, 6), dtype=torch.float32),
    "image bf16 [C,H,W], image_height/width": dict(
        shape=(4, 4, 6),
        dtype=torch.bfloat16,
        meta={"caption": "c", "image_height": 32, "image_width": 48, "aspect_ratio": 1.5},
    ),
    "image fp16 [C,1,H,W], numpy fp16 text": dict(
        shape=(4, 1, 2, 2), dtype=torch.float16, text=np.ones((2, 8), dtype=np.float16)
    ),
    "image fp32, numpy float64 text, class label": dict(
        shape=(4, 2, 2),
        dtype=torch.float32,
        text=np.ones((3, 8), dtype=np.float64),
        meta={"caption": "c", "height": 16, "width": 16, "label": 7},
    ),
    "video bf16, torch bf16 text, fps/num_frames, unknown keys": dict(
        shape=(4, 2, 2, 4),
        dtype=torch.bfloat16,
        text=torch.ones(5, 8, dtype=torch.bfloat16),
        meta={
            "caption": "c",
            "height": 16,
            "width": 32,
            "fps": 24,
            "num_frames": 5,
            "aspect_ratio": 2.0,
            "camera": {"moving": True},
        },
    ),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_cooker_and_decoder_on_format_variants(name):
    spec = VARIANTS[name]
    files = payloads(spec["shape"], dtype=spec["dtype"], text=spec.get("text"), meta=spec.get("meta"))
    cooked, encoded = cook_and_decode(files, CLASS_ENCODER if "label" in spec.get("meta", {}) else ENCODER)
    latent = torch.load(io.BytesIO(files["pth"])).float()
    video = latent if latent.dim() == 4 else latent[:, None]
    c, t, h, w = video.shape
    assert isinstance(cooked, DiffusionSample)
    assert cooked.__key__ == "shard_000000.tar/samples/x" and cooked.shard == "shard_000000.tar"
    assert cooked.latent_shape == (c, t, h, w) and cooked.grid == (t, h // 2, w // 2)
    assert cooked.seq_len == t * h * w // 4 and cooked.padded_len == -(-cooked.seq_len // 4) * 4
    assert cooked.metadata == json.loads(files["json"])  # unknown keys kept as they are
    assert cooked.latent_payload is files["pth"]  # raw bytes kept, nothing decoded in the buffer

    assert isinstance(encoded, EncodedSample)
    tokens, positions = patchify(video, 2, 1)
    assert torch.equal(encoded.tokens, tokens) and torch.equal(encoded.positions, positions)
    text = pickle.loads(files["pickle"])
    assert torch.equal(encoded.text, torch.as_tensor(text).float()) and encoded.text.dtype == torch.float32
    meta = spec.get("meta", {})
    assert encoded.fps == meta.get("fps") and encoded.label == meta.get("label")


@pytest.mark.parametrize("name", DEFECTS)
def test_each_defect_becomes_a_marker_of_its_kind(name):
    files, kind = DEFECTS[name]
    _, result = cook_and_decode(files)
    assert isinstance(result, SkippedSample), result
    assert result.kind == kind and result.__key__ == "shard_000000.tar/samples/x" and result.shard == "shard_000000.tar"


def test_padding_follows_the_layout_multiple():
    files = payloads((4, 3, 2, 6))  # 9 tokens
    for multiple, padded in ((1, 9), (4, 12), (8, 16)):
        cooked = DiTTaskEncoder(FMT, max_seq_length=32, pad_multiple=multiple).cook(crude(files))
        assert (cooked.seq_len, cooked.padded_len) == (9, padded)
    unpacked = DiTTaskEncoder(FMT, max_seq_length=32, pad_multiple=4, packing=False).cook(crude(files))
    assert unpacked.padded_len == 32
    with pytest.raises(ValueError, match="multiple"):
        DiTTaskEncoder(FMT, max_seq_length=30, pad_multiple=4, packing=False)


@pytest.mark.parametrize(
    "label, kind",
    [
        (None, SkipKind.BAD_LABEL),
        (10, SkipKind.BAD_LABEL),
        (-1, SkipKind.BAD_LABEL),
        (3.0, SkipKind.INVALID_JSON),
        (0, None),
        (9, None),
    ],
)
def test_class_conditioning_needs_a_label_in_range(label, kind):
    meta = {"caption": "c"} if label is None else {"caption": "c", "label": label}
    cooked, encoded = cook_and_decode(payloads((4, 2, 4), meta=meta), CLASS_ENCODER)
    if kind is None:
        assert isinstance(encoded, EncodedSample) and encoded.label == label
    else:
        assert isinstance(encoded, SkippedSample) and encoded.kind == kind, encoded


def test_text_conditioning_ignores_labels():
    for meta in ({"caption": "c"}, {"caption": "c", "label": 12345}):
        _, encoded = cook_and_decode(payloads((4, 2, 4), meta=meta))
        assert isinstance(encoded, EncodedSample) and encoded.label is None


def test_every_problem_of_a_sample_is_found_and_a_missing_member_names_those_found():
    files = with_members(
        json=b'["not", "an object"]',
        pth=torch_bytes(torch.zeros(4, 2, 4, dtype=torch.int64)),
        pickle=pickle.dumps(np.zeros((3, 7), np.float32)),
    )
    with pytest.raises(BadSample) as e:
        ENCODER.cooked(crude(files))
    assert [p.kind for p in (e.value, *e.value.also)] == [
        SkipKind.INVALID_JSON,
        SkipKind.NOT_A_LATENT,
        SkipKind.BAD_TEXT_EMBEDDING,
    ]
    with pytest.raises(BadSample) as e:
        ENCODER.cooked(crude({**with_members(pickle=None, json=b"[]"), "txt": b"a caption"}))
    assert e.value.detail == "no .pickle; found samples/x.json, samples/x.pth, samples/x.txt"
    assert [p.kind for p in e.value.also] == [SkipKind.INVALID_JSON]
