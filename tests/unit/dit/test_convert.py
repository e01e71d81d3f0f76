"""diffusers interop: a randomly initialised small DiTTransformer2DModel converted into our model computes
diffusers' own forward; converted back it is the same diffusers model; the command line exports a TP=2
checkpoint of the real training loop to diffusers and imports it back."""

import dataclasses

import pytest
import torch
from diffusers import DiTTransformer2DModel
from megatron.core import dist_checkpointing

from dit import convert
from dit.model.config import ARCHITECTURE_FIELDS
from dit.model.model import DiTModel
from dit.model.packed import PackedBatch
from dit.model.patchify import patchify
from tests.distributed import run_distributed
from tests.model_setup import full_weights
from tests.tiny_data import TINY_RUN, payloads, write_dataset

SMALL = dict(
    num_attention_heads=4,
    attention_head_dim=12,
    in_channels=4,
    num_layers=2,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=10,
)
# fp32 on both sides; the two models differ in summation order (fused qkv, conv vs linear patch embedding,
# attention kernels), a few ulps per operation through two blocks
RTOL, ATOL = 1e-5, 1e-5


def small_diffusers_dit(learn_sigma: bool, seed: int = 0) -> DiTTransformer2DModel:
    """Random weights everywhere (diffusers' own init leaves adaLN-Zero at zero, which would hide errors);
    the blocks share one timestep/class embedder, as in the published checkpoints."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**SMALL, out_channels=8 if learn_sigma else 4)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
        first = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
    return model.eval()


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(3, 4, 8, 8, generator=g)
    timesteps = torch.tensor([0.0, 417.0, 999.0])
    labels = torch.tensor([3, 10, 7])  # 10: the null class of classifier-free guidance
    return latents, timesteps, labels


def ours_on_images(model: DiTModel, latents, timesteps, labels) -> torch.Tensor:
    """Our model on a pack of the images, unpatchified back to ``[B, C_out, H, W]``."""
    tokens, positions = zip(*(patchify(x, model.config.patch_size) for x in latents))
    n = tokens[0].shape[0]
    cu = torch.arange(len(tokens) + 1, dtype=torch.int32) * n
    grid = latents.shape[-1] // model.config.patch_size
    batch = PackedBatch(
        tokens=torch.cat(tokens),
        positions=torch.cat(positions),
        loss_mask=None,
        cu_seqlens=cu,
        cu_seqlens_padded=cu,
        text=torch.zeros(0, 1),
        cu_seqlens_text=torch.zeros_like(cu),
        grid_sizes=torch.tensor([[1, grid, grid]] * len(tokens)),
        labels=labels,
    )
    prediction = model(batch.tokens, timesteps, batch)
    return torch.stack([x.squeeze(1) for x in model.unpatchify(prediction, batch)])


def _converted(theirs: DiTTransformer2DModel) -> DiTModel:
    config = convert.config_from_diffusers(dict(theirs.config), use_cpu_initialization=True)
    model = DiTModel(config)
    convert.load_parameters(model, convert.state_dict_from_diffusers(theirs.state_dict(), config))
    return model


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_imported_diffusers_dit_computes_diffusers_forward_and_exports_back(single_process, learn_sigma):
    theirs = small_diffusers_dit(learn_sigma)
    ours = _converted(theirs)
    assert ours.config.prediction_width == (2 if learn_sigma else 1) * ours.config.token_width
    latents, timesteps, labels = _inputs()
    with torch.no_grad():
        expected = theirs(latents, timesteps, labels).sample  # [B, C_out, H, W]
        torch.testing.assert_close(ours_on_images(ours, latents, timesteps, labels), expected, rtol=RTOL, atol=ATOL)

    # and back out: the same diffusers model, every tensor bit for bit, under diffusers' own config
    config = convert.diffusers_config(ours.config)
    assert {k: theirs.config[k] for k in config} == config
    state = convert.state_dict_to_diffusers({n: p.detach() for n, p in ours.named_parameters()}, ours.config)
    assert state.keys() == theirs.state_dict().keys()
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(state[name], tensor), name


def test_import_refuses_blocks_with_different_embedders(single_process):
    theirs = small_diffusers_dit(learn_sigma=False)
    with torch.no_grad():
        theirs.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
    with pytest.raises(ValueError, match="copies of norm1.emb.timestep_embedder.linear_1.bias differ"):
        _converted(theirs)


def test_export_refuses_a_model_diffusers_would_compute_differently(single_process):
    config = dataclasses.replace(
        convert.config_from_diffusers(dict(small_diffusers_dit(False).config)), timestep_freq_shift=0.0
    )  # the paper's sinusoid; diffusers hard-codes 1
    with pytest.raises(ValueError, match="timestep_freq_shift=1.0"):
        convert.diffusers_config(config)


TRAIN_FLAGS = TINY_RUN + [  # the tiny run, at the shapes diffusers' DiT has (class labels, sin-cos, no qk-norm)
    "--hidden-size",
    "32",
    "--train-iters",
    "2",
    "--tensor-model-parallel-size",
    "2",
    "--conditioning",
    "class",
    "--num-classes",
    "10",
    "--position-embedding",
    "sincos3d",
    "--no-qk-layernorm",
    "--timestep-freq-shift",
    "1",
    "--max-latent-grid",
    "1",
    "4",
    "4",
]


def _class_images(root):
    """Labelled images of up to 4 x 4 patches (diffusers' DiT takes square grids up to its sample size)."""
    entries = [
        (
            f"img_{i:03d}",
            payloads(
                (4, 2 * (1 + i % 4), 2 * (1 + i % 3)),
                seed=i,
                meta={"caption": "x", "height": 64, "width": 64, "label": i % 10},
            ),
        )
        for i in range(16)
    ]
    return str(write_dataset(root, entries))


def _train_tp2(data_path, save):
    """Two iterations of the real training loop at TP=2, saving at the end; the full trained and EMA weights."""
    import torch.distributed as dist

    import pretrain_dit
    from dit.training.arguments import load_run_config
    from dit.training.pretrain import pretrain

    run = load_run_config(TRAIN_FLAGS + ["--data-path", data_path, "--save", str(save)], dist.get_world_size())
    result = pretrain(run, pretrain_dit.HOOKS)
    raw = full_weights(result.setup.model[0].module, result.setup.config)
    with result.ema.applied():
        return raw, full_weights(result.setup.model[0].module, result.setup.config)


@pytest.mark.dist
@pytest.mark.slow
def test_a_tp2_training_checkpoint_exports_to_diffusers_and_imports_back(single_process, tmp_path):
    """pretrain_dit.py's checkpoint (its --save folder, TP=2) -> diffusers -> our dist checkpoint, by the
    command line: the EMA weights (the raw ones with --no-ema) each way, bit for bit."""
    raw, trained = run_distributed(_train_tp2, 2, _class_images(tmp_path / "data"), tmp_path / "run")[0]
    config = convert.checkpoint_config(convert.resolve_checkpoint(tmp_path / "run"))
    for weights, flags in ((trained, []), (raw, ["--no-ema"])):
        assert convert.main(["export", str(tmp_path / "run"), str(tmp_path / "diffusers"), *flags]) == 0
        expected = convert.state_dict_to_diffusers({n: torch.from_numpy(w) for n, w in weights.items()}, config)
        exported = DiTTransformer2DModel.from_pretrained(tmp_path / "diffusers").state_dict()
        assert exported.keys() == expected.keys()
        for name, tensor in exported.items():
            assert torch.equal(tensor, expected[name]), name
    assert any(not (raw[n] == trained[n]).all() for n in raw)  # the EMA is other weights

    assert convert.main(["export", str(tmp_path / "run"), str(tmp_path / "diffusers")]) == 0  # the EMA again
    assert convert.main(["import", str(tmp_path / "diffusers"), str(tmp_path / "ours")]) == 0
    stored = [
        dist_checkpointing.load_common_state_dict(str(path))["model_config"]
        for path in (convert.resolve_checkpoint(tmp_path / "run"), tmp_path / "ours")
    ]
    assert stored[0].keys() == stored[1].keys() == set(ARCHITECTURE_FIELDS)  # one format, both writers
    unread = {"text_embed_dim"}  # a class-conditioned model has no text input: diffusers' config does not say it
    assert {k: v for k, v in stored[0].items() if k not in unread} == {
        k: v for k, v in stored[1].items() if k not in unread
    }
    back = convert.read_checkpoint(tmp_path / "ours", convert.checkpoint_config(tmp_path / "ours"))
    assert back.keys() == trained.keys()
    for name, weight in trained.items():
        assert torch.equal(back[name], torch.from_numpy(weight)), name
