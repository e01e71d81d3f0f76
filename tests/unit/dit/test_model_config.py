"""Flags -> DiTConfig in one function: model flags, recompute, FP8 onto Megatron's own fields, and the
FP8/TE errors on a machine without them."""

import pytest
import torch

import dit.te
from dit.arguments import parse_args
from dit.errors import ConfigError
from dit.config import DiTConfig, config_from_args


def test_flags_become_config_fields():
    config = config_from_args(parse_args([
        "--model-size", "DiT-B", "--conditioning", "class", "--num-classes", "10", "--position-embedding",
        "sincos3d", "--no-qk-layernorm", "--adaln-lora-rank", "16", "--fps-conditioning", "--latent-channels", "4",
        "--temporal-patch-size", "2", "--max-latent-grid", "8", "16", "16", "--recompute-granularity", "full",
        "--recompute-num-layers", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel"]))
    assert isinstance(config, DiTConfig)
    assert (config.num_layers, config.hidden_size, config.num_attention_heads) == (12, 768, 12)
    assert (config.conditioning, config.num_classes, config.position_embedding) == ("class", 10, "sincos3d")
    assert (config.qk_layernorm, config.adaln_lora_rank, config.fps_conditioning) == (False, 16, True)
    assert (config.token_width, config.max_latent_grid) == (2 * 2 * 2 * 4, (8, 16, 16))
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == ("full", "uniform", 2)
    assert config.tensor_model_parallel_size == 2 and config.sequence_parallel
    assert config.transformer_impl == "local" and config.fp8 is None and config.has_cond_embedder


def test_selective_recompute_drops_the_full_recompute_fields():
    config = config_from_args(parse_args(["--recompute-granularity", "selective"]))
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == (
        "selective", None, None)


def test_fp8_without_te_or_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="--fp8-format"):
        config_from_args(parse_args(["--fp8-format", "e4m3", "--transformer-impl", "local"]))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--transformer-impl|--fp8-format"):
            config_from_args(parse_args(["--fp8-format", "e4m3", "--transformer-impl", "transformer_engine"]))


def test_fp8_flags_map_onto_megatron_fields(monkeypatch):
    # pretend to be the NGC container on a GPU: the mapping itself is what is checked
    monkeypatch.setattr(dit.te, "have_transformer_engine", lambda: True)
    monkeypatch.setattr(dit.te, "te_version", lambda: "2.9.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "NVIDIA H100 80GB HBM3")
    config = config_from_args(parse_args(["--transformer-impl", "transformer_engine", "--fp8-format", "hybrid",
                                          "--fp8-recipe", "tensorwise", "--bf16"]))
    assert (config.fp8, config.fp8_recipe, config.bf16, config.params_dtype) == (
        "hybrid", "tensorwise", True, torch.bfloat16)
    with pytest.raises(ConfigError, match="--fp8-recipe: mxfp8 needs compute capability 10.0 .* this NVIDIA H100"):
        config_from_args(parse_args(["--transformer-impl", "transformer_engine", "--fp8-format", "hybrid",
                                     "--fp8-recipe", "mxfp8", "--bf16"]))


def test_invalid_dit_settings_are_rejected():
    with pytest.raises(ValueError, match="dropout"):
        DiTConfig(num_layers=2, hidden_size=32, num_attention_heads=2, transformer_impl="local", hidden_dropout=0.1)
    with pytest.raises(ValueError, match="rope_fusion"):
        DiTConfig(num_layers=2, hidden_size=32, num_attention_heads=2, transformer_impl="local", apply_rope_fusion=True)
    with pytest.raises(ValueError, match="uniform recompute"):
        DiTConfig(num_layers=3, hidden_size=32, num_attention_heads=2, transformer_impl="local",
                  recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2)


def test_uniform_recompute_groups_divide_the_layers_of_a_virtual_pipeline_chunk():
    # 4 layers over pp=2 x vpp=2 chunks: one layer per chunk, which a group of 2 does not divide
    with pytest.raises(ConfigError, match="the 1 layers of a pipeline model chunk"):
        DiTConfig(num_layers=4, hidden_size=32, num_attention_heads=2, transformer_impl="local",
                  pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                  recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2)


def test_model_rejects_virtual_pipeline_stages():
    from dit.model import DiTModel

    config = DiTConfig(num_layers=4, hidden_size=32, num_attention_heads=2, transformer_impl="local",
                       pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    with pytest.raises(ValueError, match="virtual pipeline stages are not supported yet"):
        DiTModel(config)


def test_transformer_engine_config_needs_bf16_and_a_gpu(monkeypatch):
    """DiTConfig users get the flag errors too (TE mocked importable: it cannot be installed here)."""
    monkeypatch.setattr(dit.te, "have_transformer_engine", lambda: True)
    monkeypatch.setattr(dit.te, "te_version", lambda: "2.9.0")
    tiny = dict(num_layers=2, hidden_size=32, num_attention_heads=2, transformer_impl="transformer_engine")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="transformer_engine needs a CUDA GPU"):
            DiTConfig(**tiny, bf16=True, params_dtype=torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="add --bf16") as e:
        DiTConfig(**tiny)
    assert e.value.flag == "--bf16"
    assert DiTConfig(**tiny, bf16=True, params_dtype=torch.bfloat16).transformer_impl == "transformer_engine"
