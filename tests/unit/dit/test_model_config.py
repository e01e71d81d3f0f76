"""Flags -> DiTConfig in one function: model flags, recompute, FP8 onto Megatron's own fields, and the
FP8/TE errors on a machine without them."""

import pytest
import torch

import dit.model.te
from dit.errors import ConfigError
from dit.model.config import DiTConfig
from dit.training.arguments import model_config, parse_args


def test_flags_become_config_fields():
    config = model_config(
        parse_args(
            [
                "--model-size",
                "DiT-B",
                "--conditioning",
                "class",
                "--num-classes",
                "10",
                "--position-embedding",
                "sincos3d",
                "--no-qk-layernorm",
                "--adaln-lora-rank",
                "16",
                "--fps-conditioning",
                "--latent-channels",
                "4",
                "--temporal-patch-size",
                "2",
                "--max-latent-grid",
                "8",
                "16",
                "16",
                "--recompute-granularity",
                "full",
                "--recompute-num-layers",
                "2",
                "--tensor-model-parallel-size",
                "2",
                "--sequence-parallel",
            ]
        )
    )
    assert isinstance(config, DiTConfig)
    assert (config.num_layers, config.hidden_size, config.num_attention_heads) == (12, 768, 12)
    assert (config.conditioning, config.num_classes, config.position_embedding) == ("class", 10, "sincos3d")
    assert (config.qk_layernorm, config.adaln_lora_rank, config.fps_conditioning) == (False, 16, True)
    assert (config.token_width, config.max_latent_grid) == (2 * 2 * 2 * 4, (8, 16, 16))
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == (
        "full",
        "uniform",
        2,
    )
    assert config.tensor_model_parallel_size == 2 and config.sequence_parallel
    assert config.transformer_impl == "local" and config.fp8 is None and config.has_cond_embedder


def test_selective_recompute_drops_the_full_recompute_fields():
    config = model_config(parse_args(["--recompute-granularity", "selective"]))
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == (
        "selective",
        None,
        None,
    )


def test_fp8_without_te_or_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="--fp8-format"):
        model_config(parse_args(["--fp8-format", "e4m3", "--transformer-impl", "local"]))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--transformer-impl|--fp8-format"):
            model_config(parse_args(["--fp8-format", "e4m3", "--transformer-impl", "transformer_engine"]))


def test_fp8_flags_map_onto_megatron_fields(monkeypatch):
    # pretend to be the NGC container on a GPU: the mapping itself is what is checked
    monkeypatch.setattr(dit.model.te, "have_transformer_engine", lambda: True)
    monkeypatch.setattr(dit.model.te, "te_version", lambda: "2.9.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "NVIDIA H100 80GB HBM3")
    config = model_config(
        parse_args(
            [
                "--transformer-impl",
                "transformer_engine",
                "--fp8-format",
                "hybrid",
                "--fp8-recipe",
                "tensorwise",
                "--bf16",
            ]
        )
    )
    assert (config.fp8, config.fp8_recipe, config.bf16, config.params_dtype) == (
        "hybrid",
        "tensorwise",
        True,
        torch.bfloat16,
    )
    with pytest.raises(ConfigError, match="--fp8-recipe: mxfp8 needs compute capability 10.0 .* this NVIDIA H100"):
        model_config(
            parse_args(
                [
                    "--transformer-impl",
                    "transformer_engine",
                    "--fp8-format",
                    "hybrid",
                    "--fp8-recipe",
                    "mxfp8",
                    "--bf16",
                ]
            )
        )


def test_invalid_dit_settings_are_rejected():
    with pytest.raises(ValueError, match="dropout"):
        DiTConfig(num_layers=2, hidden_size=32, num_attention_heads=2, transformer_impl="local", hidden_dropout=0.1)
    with pytest.raises(ValueError, match="rope_fusion"):
        DiTConfig(num_layers=2, hidden_size=32, num_attention_heads=2, transformer_impl="local", apply_rope_fusion=True)
    with pytest.raises(ValueError, match="uniform recompute"):
        DiTConfig(
            num_layers=3,
            hidden_size=32,
            num_attention_heads=2,
            transformer_impl="local",
            recompute_granularity="full",
            recompute_method="uniform",
            recompute_num_layers=2,
        )


def test_uniform_recompute_groups_divide_the_layers_of_a_pipeline_stage():
    # 2 layers over pp=2 stages: one layer per stage, which a group of 2 does not divide
    with pytest.raises(ConfigError, match="recompute_num_layers: .*the 1 layers of a pipeline stage") as e:
        DiTConfig(
            num_layers=2,
            hidden_size=32,
            num_attention_heads=2,
            transformer_impl="local",
            pipeline_model_parallel_size=2,
            recompute_granularity="full",
            recompute_method="uniform",
            recompute_num_layers=2,
        )
    assert e.value.flag == "recompute_num_layers"  # its own field's name; the command line says the flag


def test_virtual_pipeline_stages_are_refused():
    with pytest.raises(ConfigError, match="virtual pipeline stages are not supported"):
        DiTConfig(
            num_layers=4,
            hidden_size=32,
            num_attention_heads=2,
            transformer_impl="local",
            pipeline_model_parallel_size=2,
            virtual_pipeline_model_parallel_size=2,
        )


def test_transformer_engine_config_needs_bf16_and_a_gpu(monkeypatch):
    """DiTConfig users get these errors too, named after its fields (TE mocked importable: it cannot be
    installed here)."""
    monkeypatch.setattr(dit.model.te, "have_transformer_engine", lambda: True)
    monkeypatch.setattr(dit.model.te, "te_version", lambda: "2.9.0")
    tiny = dict(num_layers=2, hidden_size=32, num_attention_heads=2, transformer_impl="transformer_engine")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="transformer_engine needs a CUDA GPU"):
            DiTConfig(**tiny, bf16=True, params_dtype=torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="add --bf16") as e:
        DiTConfig(**tiny)
    assert e.value.flag == "bf16"
    assert DiTConfig(**tiny, bf16=True, params_dtype=torch.bfloat16).transformer_impl == "transformer_engine"
