"""Transformer Engine's FP8 shape rule (``dit.model.fp8``), held on the CPU where no FP8 kernel runs.

TE's FP8 GEMMs need every dimension of a linear layer's input and weight on each rank to divide by 16 (32
under MXFP8; TE's ``cublaslt_gemm.cu``, Megatron-Core's ``get_fp8_align_size``). The model runs here in fp32
with its FP8 padding switched on (``DiTModel.fp8_recipe``), in the layouts a GPU run would have, while a
forward pre-hook on every linear of the transformer block (the layers TE runs in FP8) records what it is
given. The rule is counted from TE's source, not from our padding code, so a padding that forgets the
sequence-parallel slice (rows S/cp/tp) or the text's rows fails here.
"""

import pytest
import torch
from megatron.core import parallel_state as ps

from data.loader.rank_split import pad_multiple
from dit.errors import ConfigError
from dit.model.config import dit_config
from dit.model.fp8 import check_fp8_device, check_fp8_widths, fp8_rows
from dit.model.model import DiTModel
from dit.runtime import distributed as runtime
from dit.runtime.distributed import ParallelLayout
from tests.distributed import run_distributed
from tests.model_setup import cp_share, make_microbatch, randomize, tiny_config

RECIPES = ["delayed", "tensorwise", "blockwise", "mxfp8"]
TE_ROWS = {"delayed": 16, "tensorwise": 16, "blockwise": 16, "mxfp8": 32}  # cublaslt_gemm.cu; MXFP8's 1x32 blocks
TEXT_LENGTHS = range(1, 41)
TE_LINEARS = ("linear_qkv", "linear_proj", "linear_q", "linear_kv", "linear_fc1", "linear_fc2")


def _linear_shapes(layout: ParallelLayout, sequence_parallel: bool) -> dict[str, list[tuple]]:
    """Per recipe: (input rows, input width, weight shape) of every linear call in the transformer block."""
    runtime.initialize_model_parallel(layout)
    runtime.set_random_seed(1, per_data_parallel_rank=False)
    config = tiny_config(
        hidden_size=64,
        num_layers=2,
        conditioning="text",
        position_embedding="rope3d",
        tensor_model_parallel_size=layout.tensor,
        context_parallel_size=layout.context,
        pipeline_model_parallel_size=layout.pipeline,
        sequence_parallel=sequence_parallel,
    )
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    model = DiTModel(config, pre_process=first, post_process=last)
    randomize(model, seed=2)
    seen: list[tuple] = []
    # the backend's linears (TE's on a GPU); the adaLN projection is Megatron's own linear, which FP8 leaves alone
    linears = [m for name, m in model.decoder.named_modules() if name.rsplit(".", 1)[-1] in TE_LINEARS]
    for linear in linears:
        linear.register_forward_pre_hook(
            lambda mod, args: seen.append((args[0].shape[:-1].numel(), args[0].shape[-1], tuple(mod.weight.shape)))
        )
    shapes = {}
    for recipe in RECIPES:
        model.fp8_recipe = recipe  # the FP8 padding on, the math in fp32
        multiple = pad_multiple(layout.context, layout.tensor, sequence_parallel, recipe)
        seen.clear()
        for length in TEXT_LENGTHS:
            grids = [(1, 2 * (1 + length % 3), 6)] + [(1, 4, 4)] * (length % 2)  # 1 or 2 samples of 12-36 tokens
            mb = cp_share(
                make_microbatch(length, grids, pad_multiple=multiple, text_lengths=[length] * len(grids)),
                layout.context,
                ps.get_context_parallel_rank(),
            )
            if not first:  # what the previous stage would send: this rank's (SP slice of its) CP share
                rows = mb.batch.tokens.shape[0] // (layout.tensor if sequence_parallel else 1)
                model.set_input_tensor(torch.randn(rows, 1, config.hidden_size))
            with torch.no_grad():
                model(mb.batch.tokens, mb.timesteps, mb.batch)
        shapes[recipe] = list(seen)
        assert len(seen) == 7 * len(model.decoder.layers) * len(TEXT_LENGTHS)  # qkv, proj; q, kv, proj; fc1, fc2
    ps.destroy_model_parallel()
    return shapes


def _assert_te_accepts(per_rank: list[dict]) -> None:
    for shapes in per_rank:
        for recipe, calls in shapes.items():
            rows = TE_ROWS[recipe]
            for n, width, weight in calls:
                assert n % rows == 0 and width % rows == 0, (recipe, n, width)
                assert all(d % rows == 0 for d in weight), (recipe, weight)


@pytest.mark.slow
def test_every_fp8_linear_input_follows_tes_rule_in_one_process(single_process):
    ps.destroy_model_parallel()
    _assert_te_accepts([_linear_shapes(ParallelLayout(), False)])


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize(
    "layout, sequence_parallel",
    [
        (ParallelLayout(tensor=2), True),
        (ParallelLayout(context=2), False),
        (ParallelLayout(pipeline=2), False),
    ],
    ids=["tp2-sp", "cp2", "pp2"],
)
def test_every_fp8_linear_input_follows_tes_rule_per_rank(layout, sequence_parallel):
    _assert_te_accepts(run_distributed(_linear_shapes, 2, layout, sequence_parallel))


def test_fp8_rows_per_recipe():
    assert [fp8_rows(r) for r in RECIPES] == [TE_ROWS[r] for r in RECIPES] and fp8_rows(None) == 1


def test_widths_that_break_the_rule_are_refused_with_one_line():
    xl = dit_config("DiT-XL", tensor_model_parallel_size=8)  # 1152 / 8 = 144 per TP rank
    widths = {
        "hidden width": xl.hidden_size,
        "MLP width / tp=8": xl.ffn_hidden_size // 8,
        "query width / tp=8": xl.hidden_size // 8,
    }
    check_fp8_widths("delayed", widths)  # 144 = 9 x 16
    with pytest.raises(
        ConfigError,
        match=r"hidden_size: FP8 \(mxfp8\).* multiple of 32, and the query width / "
        r"tp=8 is 144",
    ):
        check_fp8_widths("mxfp8", widths)
    with pytest.raises(ConfigError, match="hidden_size: FP8 .*multiple of 32"):  # DiTConfig names its field
        dit_config("DiT-XL", tensor_model_parallel_size=8, fp8="hybrid", fp8_recipe="mxfp8")


@pytest.mark.parametrize(
    "recipe, capability, ok",
    [
        ("delayed", (9, 0), True),
        ("tensorwise", (8, 9), True),
        ("delayed", (8, 0), False),
        ("blockwise", (9, 0), True),
        ("mxfp8", (9, 0), False),
        ("mxfp8", (10, 0), True),
    ],
)
def test_recipes_are_refused_on_gpus_without_their_kernels(recipe, capability, ok):
    if ok:
        check_fp8_device(recipe, capability, "GPU")
    else:
        with pytest.raises(ConfigError, match=f"fp8_recipe: {recipe} needs compute capability"):
            check_fp8_device(recipe, capability, "GPU")
