"""FP8 through Transformer Engine: which GPUs run each recipe, and the shapes its GEMMs accept.

TE runs an FP8 GEMM only when every dimension of both operands suits cuBLASLt's FP8 kernels (TE
``common/gemm/cublaslt_gemm.cu``: "Leading dimension requirement on A for FP8 GEMM. Caller must pad."). On
Hopper those kernels exist only in the TN layout, so the weight-gradient GEMM reads a linear's input
transposed and its token count becomes a leading dimension: the rows (tokens) of every linear's input and
its width must divide by 16, and by 32 under MXFP8's 1x32 scaling blocks (Megatron-Core's
``fp8_utils.get_fp8_align_size`` says the same). TE checks each rank's *local* input: under sequence
parallelism that is the rank's 1/tp slice, before TE's all-gather, and under context parallelism the CP
rank's share. No FP8 kernel runs on the CPU, but the rules do: they shape the padding (``dit.model.sequence``,
``data.loader.rank_split``), are checked at launch, and ``tests/unit/dit/test_fp8_alignment.py`` holds them.
"""

from __future__ import annotations

from dit.errors import ConfigError

# TE's ``check_recipe_support`` (``transformer_engine/pytorch/quantization.py``, 2.9 to 2.18): the compute
# capability each recipe needs, and the GPUs that are the first to have it.
MIN_CAPABILITY = {
    "delayed": ((8, 9), "Ada (L40S) or Hopper (H100, H200) and newer"),
    "tensorwise": ((8, 9), "Ada (L40S) or Hopper (H100, H200) and newer"),
    "blockwise": ((9, 0), "Hopper (H100, H200) and newer, with CUDA 12.9+"),
    "mxfp8": ((10, 0), "Blackwell data-centre GPUs (B200, GB200); not Hopper"),
}


def active_recipe(fp8_format: str | None, fp8_recipe: str) -> str | None:
    """The recipe whose rules apply: ``fp8_recipe`` under FP8 (``--fp8-format`` set), None without FP8."""
    return fp8_recipe if fp8_format else None


def fp8_rows(fp8_recipe: str | None) -> int:
    """The multiple every FP8 GEMM dimension must be on each rank (tokens of a linear's input, and its
    widths): 1 without FP8."""
    if fp8_recipe is None:
        return 1
    return 32 if fp8_recipe == "mxfp8" else 16


def check_fp8_widths(fp8_recipe: str, widths: dict[str, int]) -> None:
    """Raise one line when a linear layer's width on a TP rank (``widths``, by name) breaks TE's FP8 rule."""
    multiple = fp8_rows(fp8_recipe)
    for name, width in widths.items():
        if width % multiple:
            raise ConfigError(
                "hidden_size",
                f"FP8 ({fp8_recipe}) needs every linear layer's width on a TP rank "
                f"to be a multiple of {multiple}, and the {name} is {width}: pick a "
                "--hidden-size (--model-size) and --tensor-model-parallel-size that "
                f"give multiples of {multiple}",
            )


def check_fp8_device(fp8_recipe: str, capability: tuple[int, int], name: str) -> None:
    """Raise one line when this GPU lacks the recipe's FP8 kernels (TE would fail at the first forward)."""
    needed, gpus = MIN_CAPABILITY[fp8_recipe]
    if capability < needed:
        raise ConfigError(
            "fp8_recipe",
            f"{fp8_recipe} needs compute capability {needed[0]}.{needed[1]} "
            f"({gpus}); this {name} has {capability[0]}.{capability[1]}: pick "
            "another recipe (delayed or tensorwise run on Hopper)",
        )
