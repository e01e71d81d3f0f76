"""The layer spec: one function builds the TE and the local variant; the TE one is Megatron-Core's own TE
classes (checked here without TE) and, where TE imports, computes what the local one computes."""

import pytest
import torch
from megatron.core.extensions import transformer_engine as mcore_te
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp

from dit.model.attention import PackedAttention
from dit.model.layer_spec import QKNorm, get_dit_layer_spec
from dit.model.te import have_transformer_engine
from dit.model.te_attention import PackedTEAttention


def _slots(spec):
    s = spec.submodules
    sa, ca, mlp = s.self_attention.submodules, s.cross_attention.submodules, s.mlp.submodules
    return dict(
        qkv=sa.linear_qkv,
        core=sa.core_attention,
        proj=sa.linear_proj,
        q_norm=sa.q_layernorm,
        k_norm=sa.k_layernorm,
        q=ca.linear_q,
        kv=ca.linear_kv,
        cross_core=ca.core_attention,
        cross_proj=ca.linear_proj,
        fc1=mlp.linear_fc1,
        fc2=mlp.linear_fc2,
    )


def test_one_function_gives_te_and_local_variants():
    te = _slots(get_dit_layer_spec("transformer_engine", cross_attention=True, qk_layernorm=True))
    local = _slots(get_dit_layer_spec("local", cross_attention=True, qk_layernorm=True))
    column, row = {"qkv", "q", "kv", "fc1"}, {"proj", "cross_proj", "fc2"}
    for slot in column:
        assert te[slot] is mcore_te.TEColumnParallelLinear and local[slot] is ColumnParallelLinear
    for slot in row:
        assert te[slot] is mcore_te.TERowParallelLinear and local[slot] is RowParallelLinear
    for slot in ("core", "cross_core"):  # Megatron-Core's, told pad_between_seqs (dit.model.te_attention)
        assert te[slot] is PackedTEAttention and local[slot] is PackedAttention
    for slot in ("q_norm", "k_norm"):
        assert te[slot] is mcore_te.TENorm and local[slot] is QKNorm


def test_class_conditioning_has_no_cross_attention_and_qk_norm_is_optional():
    spec = get_dit_layer_spec("local", cross_attention=False, qk_layernorm=False)
    assert spec.submodules.cross_attention is IdentityOp
    assert spec.submodules.self_attention.submodules.q_layernorm is IdentityOp
    assert spec.submodules.adaln.params == {"num_chunks": 6}


# bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.004); two tiny layers of bf16 matmuls against fp32
# stay within a few steps of outputs of size ~1
BF16_TOL = 3e-2


def test_bf16_local_model_matches_fp32(single_process):
    """Every parameter in the parameter dtype and the inputs cast to it: a bf16 model runs forward and backward."""
    from dit.model.model import DiTModel
    from tests.model_setup import make_microbatch, randomize, tiny_config

    mb = make_microbatch(52, [(1, 4, 6), (1, 2, 4)])
    for fields in (dict(conditioning="text", fps_conditioning=True), dict(conditioning="class", adaln_lora_rank=4)):
        fp32 = DiTModel(tiny_config(**fields))
        bf16 = DiTModel(tiny_config(**fields, bf16=True, params_dtype=torch.bfloat16))
        randomize(fp32, seed=4)
        bf16.load_state_dict(fp32.state_dict())
        assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
        expected = fp32(mb.batch.tokens, mb.timesteps, mb.batch)
        got = bf16(mb.batch.tokens, mb.timesteps, mb.batch)
        assert got.dtype == torch.bfloat16
        real = mb.batch.loss_mask
        torch.testing.assert_close(got[real].float(), expected[real].detach(), rtol=BF16_TOL, atol=BF16_TOL)
        got[real].float().square().mean().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in bf16.parameters())


_MISSING = [
    what
    for what, present in (
        ("Transformer Engine is not importable (it ships in the NGC PyTorch container)", have_transformer_engine()),
        ("no CUDA GPU", torch.cuda.is_available()),
    )
    if not present
]


@pytest.mark.skipif(bool(_MISSING), reason="the TE spec runs with TE on a GPU: " + "; ".join(_MISSING))
def test_te_spec_matches_local_spec_on_gpu():
    from dit.model.model import DiTModel
    from dit.runtime import distributed as runtime
    from tests.model_setup import make_microbatch, randomize, tiny_config

    runtime.init_distributed()
    runtime.initialize_model_parallel(runtime.ParallelLayout())
    try:
        mb = make_microbatch(51, [(1, 4, 6), (1, 2, 4)])
        batch = mb.batch.to("cuda")
        bf16 = dict(use_cpu_initialization=False, bf16=True, params_dtype=torch.bfloat16)
        local = DiTModel(tiny_config(use_cpu_initialization=False)).cuda()  # the fp32 reference
        te = DiTModel(tiny_config(**bf16, transformer_impl="transformer_engine")).cuda()  # TE's THD attention: bf16
        randomize(local, seed=3)
        missing, unexpected = te.load_state_dict(local.state_dict(), strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing)
        with torch.no_grad():
            expected = local(batch.tokens, mb.timesteps.cuda(), batch)
            got = te(batch.tokens, mb.timesteps.cuda(), batch)
        real = batch.loss_mask
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got[real].float(), expected[real], rtol=BF16_TOL, atol=BF16_TOL)
    finally:
        runtime.destroy()
