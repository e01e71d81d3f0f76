"""The conditioning embedders, replicated on every pipeline stage: built as pretrain_dit.py builds them they
start equal on every stage, and a PP=2 model saves a dist checkpoint that loads at PP=2 and at PP=1."""

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from dit.runtime import distributed as runtime
from dit.training.arguments import model_config, parse_args
from tests.distributed import run_distributed
from tests.model_setup import global_name

pytestmark = pytest.mark.dist

FLAGS = [
    "--model-size",
    "DiT-debug",
    "--latent-channels",
    "4",
    "--text-embed-dim",
    "16",
    "--transformer-impl",
    "local",
    "--fps-conditioning",
]
CONDITIONING = ("t_embedder.", "fps_embedder.", "text_projection.")


def _provided(argv: list[str], seed: int):
    """This stage's model, seeded and built exactly as pretrain_dit.main does."""
    from pretrain_dit import model_provider

    runtime.set_random_seed(seed, per_data_parallel_rank=False)
    return model_provider(model_config(parse_args(argv)), ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())


def _weights(model) -> dict:
    offset = get_transformer_layer_offset(model.config)
    return {global_name(n, offset): p.detach().clone().numpy() for n, p in model.named_parameters()}


def _load(model, ckpt_dir: str) -> dict:
    sharded = model.sharded_state_dict(metadata=ensure_metadata_has_dp_cp_group(None))
    model.load_state_dict(dist_checkpointing.load(sharded, ckpt_dir))
    return _weights(model)


def _save_pp2_load_pp2_and_pp1(ckpt_dir: str) -> dict:
    runtime.initialize_model_parallel(runtime.ParallelLayout(pipeline=2))
    pp2 = FLAGS + ["--pipeline-model-parallel-size", "2"]
    model = _provided(pp2, seed=1234)
    result = {"built": _weights(model)}
    dist_checkpointing.save(model.sharded_state_dict(metadata=ensure_metadata_has_dp_cp_group(None)), ckpt_dir)
    result["loaded_pp2"] = _load(_provided(pp2, seed=99), ckpt_dir)  # another seed: all must come from disk
    ps.destroy_model_parallel()
    runtime.initialize_model_parallel(runtime.ParallelLayout())  # PP=1 (DP=2)
    result["loaded_pp1"] = _load(_provided(FLAGS, seed=7), ckpt_dir)
    return result


def test_conditioning_starts_equal_on_every_stage_and_pp2_checkpoint_loads_at_pp2_and_pp1(tmp_path):
    (tmp_path / "ckpt").mkdir()
    stage0, stage1 = run_distributed(_save_pp2_load_pp2_and_pp1, 2, str(tmp_path / "ckpt"))

    # runtime.set_random_seed offsets the seed per stage; the conditioning must still start identical, or the
    # cross-stage gradient sum of finalize_model_grads updates weights that never agree
    conditioning = [n for n in stage0["built"] if n.startswith(CONDITIONING)]
    assert conditioning and set(conditioning) == {n for n in stage1["built"] if n.startswith(CONDITIONING)}
    for name in conditioning:
        assert (stage0["built"][name] == stage1["built"][name]).all(), name

    saved = {**stage1["built"], **stage0["built"]}
    assert len(saved) == len(stage0["loaded_pp1"])  # the PP=1 model has every parameter of both stages
    for stage in (stage0, stage1):
        for key in ("loaded_pp2", "loaded_pp1"):
            for name, weight in stage[key].items():
                assert torch.equal(torch.from_numpy(weight), torch.from_numpy(saved[name])), (key, name)
