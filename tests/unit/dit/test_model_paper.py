"""The DiT paper's model: its 2D sin-cos position table (and a video table in which every channel moves), its
initialisation at any TP size, and the parameter count of class-conditioned DiT-XL/2 (675,129,632)."""

import math

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed

from dit.model.config import dit_config
from dit.model.embeddings import SinCos3D
from dit.model.init import EMBEDDING_STD
from dit.model.model import DiTModel
from dit.runtime.distributed import ParallelLayout
from tests.distributed import run_distributed
from tests.model_setup import tiny_config


def paper_2d_table(embed_dim: int, rows: int, cols: int) -> np.ndarray:
    """facebookresearch/DiT's get_2d_sincos_pos_embed (from MAE), written out for a rows x cols grid."""

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(cols, dtype=np.float64), np.arange(rows, dtype=np.float64))  # w goes first
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def _table(config, t, h, w):
    positions = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    return SinCos3D(config)(positions.reshape(-1, 3))  # [t*h*w, hidden], tokens in (t, h, w) raster order


def test_image_table_is_the_papers_and_diffusers():
    config = tiny_config(position_embedding="sincos3d", max_latent_grid=(1, 8, 8))
    ours = _table(config, 1, 4, 6)  # not square: a swap of the axes would show
    assert torch.equal(ours, torch.from_numpy(paper_2d_table(48, 4, 6)).float())
    square = get_2d_sincos_pos_embed(48, 8, base_size=8, output_type="pt").float()  # diffusers' DiT table
    torch.testing.assert_close(_table(config, 1, 8, 8), square, rtol=0, atol=1e-6)


def test_every_channel_of_a_video_table_varies_with_time_and_space():
    config = tiny_config(position_embedding="sincos3d", max_latent_grid=(4, 8, 8))
    table = _table(config, 4, 3, 5).reshape(4, 3, 5, -1)  # [T, H, W, hidden]
    over_time = table.amax(0) - table.amin(0)  # [H, W, hidden]
    assert (over_time > 0).all(), "a channel constant in time"
    assert (table.flatten(0, 2).std(0) > 0).all(), "a channel constant over the video"
    assert torch.equal(table[0].flatten(0, 1), _table(config, 1, 3, 5)), "frame 0 must be the image table"


def _expected_rule(name: str) -> str:
    """The paper's initialize_weights, by parameter name (independent of dit.model.init's by-module rules)."""
    if name.startswith(("t_embedder.", "fps_embedder.", "class_embedder.", "text_projection.")):
        return "zero" if name.endswith("bias") else "normal"
    if ".adaln.up." in name or name.startswith("final_layer.linear."):
        return "zero"
    if name.endswith("bias"):
        return "zero"
    if "layernorm" in name:
        return "one"
    return "xavier"


def _check_paper_init(model: DiTModel, tp: int) -> dict:
    """Check every parameter against its rule; the xavier bound is that of the full (TP=1) matrix."""
    seen = {}
    for name, p in model.named_parameters():
        rule, w = _expected_rule(name), p.detach()
        if rule == "xavier":
            shape = list(p.shape)
            if getattr(p, "tensor_model_parallel", False):
                shape[p.partition_dim] *= tp
            bound = math.sqrt(6 / (shape[0] + math.prod(shape[1:])))
            assert w.abs().max() <= bound, (name, float(w.abs().max()), bound)
            assert w.abs().max() > 0.95 * bound, (name, float(w.abs().max()), bound)  # >= 1000 draws each
            assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.1, name
        elif rule == "normal":
            assert abs(w.mean()) < 0.2 * EMBEDDING_STD and abs(w.std() / EMBEDDING_STD - 1) < 0.1, name
        else:
            assert torch.equal(w, torch.full_like(w, 0.0 if rule == "zero" else 1.0)), name
        seen[name] = rule
    return seen


FIELDS = dict(conditioning="text", fps_conditioning=True, adaln_lora_rank=8, hidden_size=96)


def test_fresh_model_has_the_papers_initialisation(single_process):
    for fields in (FIELDS, dict(conditioning="class", hidden_size=96, position_embedding="sincos3d")):
        seen = _check_paper_init(DiTModel(tiny_config(**fields)), tp=1)
        assert set(seen.values()) == {"xavier", "normal", "zero", "one"}


def _tp2_init():
    """Both ways of drawing at TP=2, each checked on this rank; returns the CPU-initialised full tensors."""
    from megatron.core import parallel_state as ps

    from dit.runtime import distributed as runtime

    runtime.initialize_model_parallel(ParallelLayout(tensor=2))
    for cpu_initialization in (False, True):
        runtime.set_random_seed(1234, per_data_parallel_rank=False)
        model = DiTModel(tiny_config(**FIELDS, tensor_model_parallel_size=2, use_cpu_initialization=cpu_initialization))
        _check_paper_init(model, tp=2)
    full = {}
    for name, p in model.named_parameters():  # gathered to full tensors
        parts = [torch.empty_like(p) for _ in range(2)]
        torch.distributed.all_gather(parts, p.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
        full[name] = (
            torch.cat(parts, p.partition_dim).numpy()
            if getattr(p, "tensor_model_parallel", False)
            else p.detach().numpy()
        )
    ps.destroy_model_parallel()
    return full


@pytest.mark.dist
def test_tp2_initialisation_has_the_full_matrix_distribution(single_process):
    """Without CPU initialisation each rank draws its shard, from the distribution of the full matrix (checked
    on each rank); with it the TP=2 shards are the TP=1 weights drawn from the same seed."""
    ranks = run_distributed(_tp2_init, 2)
    from dit.runtime import distributed as runtime

    runtime.set_random_seed(1234, per_data_parallel_rank=False)
    reference = DiTModel(tiny_config(**FIELDS))
    for name, p in reference.named_parameters():
        assert np.array_equal(ranks[0][name], p.detach().numpy()), name


def test_dit_xl_2_with_the_papers_settings_counts_675129632(single_process):
    config = dit_config(
        "DiT-XL",
        conditioning="class",
        latent_channels=4,
        patch_size=2,
        max_latent_grid=(1, 32, 32),
        position_embedding="sincos3d",
        qk_layernorm=False,
        learn_sigma=True,
        use_cpu_initialization=True,
        perform_initialization=False,
        transformer_impl="local",
    )
    with torch.device("meta"):
        count = sum(p.numel() for p in DiTModel(config).parameters())
    # the paper stores its fixed 256 x 1152 position table as a (frozen) parameter; ours is a buffer
    assert count + 256 * 1152 == 675_129_632
