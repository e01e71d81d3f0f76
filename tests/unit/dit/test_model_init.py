"""adaLN-Zero: a fresh model outputs zeros, and each of its blocks starts as the identity."""

import torch

from dit.model.model import DiTModel
from tests.model_setup import make_microbatch, tiny_config


def test_fresh_model_outputs_zero_and_blocks_are_identity(single_process):
    images = make_microbatch(21, [(1, 4, 6), (1, 2, 2)])
    videos = make_microbatch(22, [(4, 4, 6), (2, 2, 2)], temporal_patch=2)  # 2 frames per token
    for conditioning, pt, mb in (("text", 1, images), ("class", 2, videos)):
        config = tiny_config(
            conditioning=conditioning,
            fps_conditioning=True,
            adaln_lora_rank=4,
            temporal_patch_size=pt,
            position_embedding="sincos3d" if pt == 2 else "rope3d",
        )
        with torch.no_grad():
            out = DiTModel(config)(mb.batch.tokens, mb.timesteps, mb.batch)
            assert out.shape == mb.batch.tokens.shape
            assert torch.count_nonzero(out) == 0

            trunk = DiTModel(config, post_process=False)  # patch embedding + blocks only
            hidden = trunk(mb.batch.tokens, mb.timesteps, mb.batch)  # [S, 1, h]
            embedded = trunk.patch_embed(mb.batch.tokens)
            if trunk.pos_embed is not None:
                embedded = embedded + trunk.pos_embed(mb.batch.positions)
            assert torch.equal(hidden.squeeze(1), embedded)
