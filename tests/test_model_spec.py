"""The layer spec: one function builds the TE and the local variant; the TE one is Megatron-Core's own TE
classes (checked here without TE) and, where TE imports, computes what the local one computes."""

import pytest
import torch
from megatron.core.extensions import transformer_engine as mcore_te
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp

from dit.attention import PackedAttention
from dit.layer_spec import QKNorm, get_dit_layer_spec
from dit.te import have_transformer_engine


def _slots(spec):
    s = spec.submodules
    sa, ca, mlp = s.self_attention.submodules, s.cross_attention.submodules, s.mlp.submodules
    return dict(qkv=sa.linear_qkv, core=sa.core_attention, proj=sa.linear_proj, q_norm=sa.q_layernorm,
                k_norm=sa.k_layernorm, q=ca.linear_q, kv=ca.linear_kv, cross_core=ca.core_attention,
                cross_proj=ca.linear_proj, fc1=mlp.linear_fc1, fc2=mlp.linear_fc2)


def test_one_function_gives_te_and_local_variants():
    te = _slots(get_dit_layer_spec("transformer_engine", cross_attention=True, qk_layernorm=True))
    local = _slots(get_dit_layer_spec("local", cross_attention=True, qk_layernorm=True))
    column, row = {"qkv", "q", "kv", "fc1"}, {"proj", "cross_proj", "fc2"}
    for slot in column:
        assert te[slot] is mcore_te.TEColumnParallelLinear and local[slot] is ColumnParallelLinear
    for slot in row:
        assert te[slot] is mcore_te.TERowParallelLinear and local[slot] is RowParallelLinear
    for slot in ("core", "cross_core"):
        assert te[slot] is mcore_te.TEDotProductAttention and local[slot] is PackedAttention
    for slot in ("q_norm", "k_norm"):
        assert te[slot] is mcore_te.TENorm and local[slot] is QKNorm


def test_class_conditioning_has_no_cross_attention_and_qk_norm_is_optional():
    spec = get_dit_layer_spec("local", cross_attention=False, qk_layernorm=False)
    assert spec.submodules.cross_attention is IdentityOp
    assert spec.submodules.self_attention.submodules.q_layernorm is IdentityOp
    assert spec.submodules.adaln.params == {"num_chunks": 6}


_MISSING = [what for what, present in (
    ("Transformer Engine is not importable (it ships in the NGC PyTorch container)", have_transformer_engine()),
    ("no CUDA GPU", torch.cuda.is_available())) if not present]


@pytest.mark.skipif(bool(_MISSING), reason="the TE spec runs with TE on a GPU: " + "; ".join(_MISSING))
def test_te_spec_matches_local_spec_on_gpu():
    from dit import runtime
    from dit.model import DiTModel
    from tests.model_setup import make_microbatch, randomize, tiny_config

    runtime.init_distributed()
    runtime.initialize_model_parallel(runtime.ParallelLayout())
    try:
        mb = make_microbatch(51, [(1, 4, 6), (1, 2, 4)])
        batch = mb.batch.to("cuda")
        local = DiTModel(tiny_config(use_cpu_initialization=False)).cuda()
        te = DiTModel(tiny_config(use_cpu_initialization=False, transformer_impl="transformer_engine")).cuda()
        randomize(local, seed=3)
        missing, unexpected = te.load_state_dict(local.state_dict(), strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing)
        with torch.no_grad():
            expected = local(batch.tokens, mb.timesteps.cuda(), batch)
            got = te(batch.tokens, mb.timesteps.cuda(), batch)
        real = batch.loss_mask
        torch.testing.assert_close(got[real], expected[real], rtol=1e-3, atol=1e-3)  # TE kernels may use TF32
    finally:
        runtime.destroy()
