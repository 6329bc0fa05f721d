"""Our Llama against transformers (causal) and against a direct bidirectional implementation."""

import math

import pytest
import torch

from policies.vla.config import tiny_config
from policies.vla.llama import LanguageModel
from tests.tiny_vla import stream


@pytest.fixture(scope="module")
def llm():
    torch.manual_seed(0)
    return LanguageModel(tiny_config().llm).eval()


def test_causal_mode_matches_transformers_llama(llm):
    from transformers import LlamaConfig, LlamaModel

    s = llm.sizes
    hf = LlamaModel(LlamaConfig(
        vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
        rms_norm_eps=s.rms_norm_eps, rope_theta=s.rope_theta, attn_implementation="sdpa",
    )).eval()
    hf.load_state_dict(llm.model.state_dict(), strict=True)
    x = torch.randn(2, 37, s.hidden_size)
    with torch.no_grad():
        ref = hf(inputs_embeds=x, position_ids=torch.arange(37).expand(2, 37)).last_hidden_state
        ours = llm(stream(x), causal=True)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)


def direct_bidirectional(llm, x, positions):
    """Textbook Llama layers with full attention, written out without SDPA."""
    s = llm.sizes
    hd, h, kvh = s.head_dim, s.num_heads, s.num_kv_heads

    def rms(v, w):
        return w * (v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + s.rms_norm_eps))

    def rope(v):
        freqs = positions[..., None].float() / (s.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
        cos, sin = freqs.cos()[:, None], freqs.sin()[:, None]
        a, b = v[..., : hd // 2], v[..., hd // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    bsz, t, _ = x.shape
    for layer in llm.model.layers:
        at = layer.self_attn
        y = rms(x, layer.input_layernorm.weight)
        q = rope((y @ at.q_proj.weight.T).view(bsz, t, h, hd).transpose(1, 2))
        k = rope((y @ at.k_proj.weight.T).view(bsz, t, kvh, hd).transpose(1, 2)).repeat_interleave(h // kvh, 1)
        v = (y @ at.v_proj.weight.T).view(bsz, t, kvh, hd).transpose(1, 2).repeat_interleave(h // kvh, 1)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        x = x + ((weights @ v).transpose(1, 2).reshape(bsz, t, h * hd)) @ at.o_proj.weight.T
        y = rms(x, layer.post_attention_layernorm.weight)
        m = layer.mlp
        x = x + (torch.nn.functional.silu(y @ m.gate_proj.weight.T) * (y @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    return rms(x, llm.model.norm.weight)


def test_bidirectional_mode_matches_a_direct_implementation(llm):
    x = torch.randn(2, 41, llm.sizes.hidden_size)
    positions = torch.arange(41).expand(2, 41)
    with torch.no_grad():
        ours = llm(stream(x))
        ref = direct_bidirectional(llm, x, positions)
        causal = llm(stream(x), causal=True)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(ours[:, :-1], causal[:, :-1], atol=1e-3)  # early tokens see later ones


def test_explicit_positions_keep_original_rope_after_removing_tokens(llm):
    """Dropping tokens but keeping their positions equals a direct computation on the kept set."""
    x = torch.randn(1, 30, llm.sizes.hidden_size)
    keep = torch.tensor([0, 3, 4, 9, 15, 16, 22, 29])
    positions = keep[None]
    with torch.no_grad():
        ours = llm(stream(x[:, keep], positions))
        ref = direct_bidirectional(llm, x[:, keep], positions)
        renumbered = llm(stream(x[:, keep]))
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, renumbered, atol=1e-4)


def test_left_padding_is_masked_out(llm):
    d = llm.sizes.hidden_size
    x = torch.randn(1, 20, d)
    padded = torch.cat([torch.randn(1, 5, d) * 100, x], dim=1)
    positions = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.arange(20)[None]], dim=1)
    padding = torch.zeros(1, 25, dtype=torch.bool)
    padding[:, :5] = True
    with torch.no_grad():
        alone = llm(stream(x))
        with_pad = llm(stream(padded, positions, padding))
    assert torch.allclose(with_pad[:, 5:], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_a_left_padded_batch_equals_its_samples_alone(llm, causal):
    d = llm.sizes.hidden_size
    short, long = torch.randn(1, 20, d), torch.randn(1, 25, d)
    batch = torch.cat([torch.cat([torch.zeros(1, 5, d), short], dim=1), long])
    positions = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.arange(20)[None]], dim=1),
                           torch.arange(25)[None]])
    padding = torch.zeros(2, 25, dtype=torch.bool)
    padding[0, :5] = True
    with torch.no_grad():
        together = llm(stream(batch, positions, padding), causal=causal)
        alone = [llm(stream(short), causal=causal), llm(stream(long), causal=causal)]
    assert torch.isfinite(together).all()
    assert torch.allclose(together[0, 5:], alone[0][0], atol=1e-5, rtol=0)
    assert torch.allclose(together[1], alone[1][0], atol=1e-5, rtol=0)


def test_bf16_forward_runs_and_stays_finite(llm):
    model = LanguageModel(llm.sizes).eval()
    model.load_state_dict(llm.state_dict())
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        out = model(stream(torch.randn(1, 16, llm.sizes.hidden_size, dtype=torch.bfloat16)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_fused_projections_compute_the_same_and_keep_the_checkpoint_weights():
    torch.manual_seed(1)
    llm = LanguageModel(tiny_config().llm).eval()
    x = torch.randn(2, 12, llm.sizes.hidden_size)
    long = torch.randn(2, 160, llm.sizes.hidden_size)  # 320 tokens: past FUSED_BELOW_TOKENS, separate products
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    with torch.no_grad():
        unfused, unfused_long = llm(stream(x)), llm(stream(long))
        llm.fuse_projections()
        llm.fuse_gate_up()
        fused, fused_long = llm(stream(x)), llm(stream(long))
    assert torch.allclose(unfused, fused, atol=1e-5) and torch.equal(unfused_long, fused_long)
    after = llm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    attn = llm.model.layers[0].self_attn
    # the named weights view the fused one: no second copy
    assert attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()
    assert attn.v_proj.weight.untyped_storage().data_ptr() == attn.qkv_weight.untyped_storage().data_ptr()
    mlp = llm.model.layers[0].mlp
    assert mlp.gate_proj.weight.data_ptr() == mlp.gate_up_weight.data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.gate_up_weight.untyped_storage().data_ptr()


def test_compiled_element_wise_chains_compute_the_same_where_graphs_record(llm):
    from policies.vla.graphs import recording
    from policies.vla.llama import EAGER, compiled_kernels
    from tests.tiny_vla import compiled_calls

    x = torch.randn(1, 12, llm.sizes.hidden_size)
    padding = torch.zeros(1, 12, dtype=torch.bool)
    padding[0, :3] = True
    try:
        with torch.no_grad():
            eager = llm(stream(x, padding=padding))
            llm.use_kernels(compiled_kernels())
            outside, calls_outside = compiled_calls(lambda: llm(stream(x, padding=padding)))
            with recording():
                compiled, calls = compiled_calls(lambda: llm(stream(x, padding=padding)))
                compiled_other_length = llm(stream(x[:, :7]))  # dynamic shapes: no recompilation needed
            llm.use_kernels(EAGER)
            eager_other_length = llm(stream(x[:, :7]))
    finally:
        llm.use_kernels(EAGER)
    assert all(layer.mlp.kernels is EAGER for layer in llm.model.layers)
    assert calls > 0 and calls_outside == 0  # called one by one, eager operators cost less on the host
    assert torch.equal(outside, eager)
    assert torch.allclose(eager[:, 3:], compiled[:, 3:], atol=1e-5)
    assert torch.allclose(eager_other_length, compiled_other_length, atol=1e-5)


def test_rope_equals_llamas_formula_bit_for_bit_in_bf16():
    from policies.vla.llama import apply_rope, rope_cos_sin

    torch.manual_seed(0)
    x = torch.randn(1, 300, 4, 64).to(torch.bfloat16)
    positions = torch.arange(300)[None]
    cos, signed_sin = rope_cos_sin(positions, 64, 10000.0, torch.bfloat16)
    sin = torch.cat((-signed_sin[..., :32], signed_sin[..., 32:]), dim=-1)  # Llama's table
    rotate_half = torch.cat((-x[..., 32:], x[..., :32]), dim=-1)
    assert torch.equal(apply_rope(x, cos, signed_sin), x * cos + rotate_half * sin)
