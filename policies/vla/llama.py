"""A Llama decoder, bidirectional by default, as OpenVLA-OFT runs it.

Parameter names follow transformers' ``LlamaForCausalLM`` (``model.layers.{i}.self_attn.q_proj``
...) so checkpoints load without renaming. RoPE takes explicit position ids, so tokens keep
their original positions after others are pruned. The vocabulary projection ``lm_head`` is
loaded (it is in the checkpoint) but never computed: the action head reads hidden states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from policies.vla.config import LlamaSizes
from policies.vla.hooks import ExtraKeys, Hooks, QueryTrace, TokenStream


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In fp32 as Llama does, then back to the input's dtype before the weight.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin of shape (B, T, head_dim), computed in fp32 (the half-split layout of Llama)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, sizes: LlamaSizes):
        super().__init__()
        d, hd = sizes.hidden_size, sizes.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = sizes.num_heads, sizes.num_kv_heads, hd
        self.q_proj = nn.Linear(d, sizes.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, sizes.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, sizes.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(sizes.num_heads * hd, d, bias=False)

    def forward(self, x, cos, sin, attn_mask, causal: bool, extra: ExtraKeys | None = None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = k, v
        if extra is not None:
            if causal:
                raise ValueError("extra keys (reused from an earlier query) need bidirectional attention")
            keys, values = torch.cat([k, extra.k.to(k.dtype)], dim=2), torch.cat([v, extra.v.to(v.dtype)], dim=2)
            attn_mask = _extend_mask(attn_mask, extra, b, t, x.device)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=attn_mask, is_causal=causal and attn_mask is None,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(out), q, k, v


def _extend_mask(attn_mask, extra: ExtraKeys, b: int, t: int, device) -> torch.Tensor | None:
    if attn_mask is None and extra.valid is None:
        return None
    own = attn_mask if attn_mask is not None else torch.ones(b, 1, 1, t, dtype=torch.bool, device=device)
    reused = extra.valid if extra.valid is not None else torch.ones(b, extra.k.shape[2], dtype=torch.bool)
    return torch.cat([own, reused.to(device)[:, None, None, :]], dim=-1)


class MLP(nn.Module):
    def __init__(self, sizes: LlamaSizes):
        super().__init__()
        self.gate_proj = nn.Linear(sizes.hidden_size, sizes.intermediate_size, bias=False)
        self.up_proj = nn.Linear(sizes.hidden_size, sizes.intermediate_size, bias=False)
        self.down_proj = nn.Linear(sizes.intermediate_size, sizes.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, sizes: LlamaSizes):
        super().__init__()
        self.self_attn = Attention(sizes)
        self.mlp = MLP(sizes)
        self.input_layernorm = RMSNorm(sizes.hidden_size, sizes.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(sizes.hidden_size, sizes.rms_norm_eps)

    def forward(self, x, cos, sin, attn_mask, causal: bool = False, extra: ExtraKeys | None = None):
        attn_out, q, k, v = self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, causal, extra)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, q, k, v


class LlamaBody(nn.Module):
    """``model.*`` of a Llama checkpoint: embeddings, decoder layers, final norm."""

    def __init__(self, sizes: LlamaSizes):
        super().__init__()
        self.sizes = sizes
        self.embed_tokens = nn.Embedding(sizes.vocab_size, sizes.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(sizes) for _ in range(sizes.num_layers))
        self.norm = RMSNorm(sizes.hidden_size, sizes.rms_norm_eps)


class LanguageModel(nn.Module):
    """``language_model.*``: the Llama body plus the (unused) vocabulary projection."""

    def __init__(self, sizes: LlamaSizes):
        super().__init__()
        self.sizes = sizes
        self.model = LlamaBody(sizes)
        self.lm_head = nn.Linear(sizes.hidden_size, sizes.vocab_size, bias=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, stream: TokenStream, hooks: Hooks | None = None, causal: bool = False,
                traces: list[QueryTrace] | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T', D) of the stream after every layer and hook."""
        hooks = hooks or Hooks()
        stream = hooks.before_llm(stream)
        recorder = _LayerCounts() if traces is not None else None
        positions = padding = cos = sin = mask = None
        for index, layer in enumerate(self.model.layers):
            skipped = hooks.skip_layer(index)
            extra = None if skipped else hooks.extra_keys(index, stream)
            if recorder is not None:
                recorder.record(stream, skipped, extra)
            if skipped:
                continue
            if stream.position_ids is not positions or stream.padding is not padding:
                # Recomputed only when a hook changed the tokens: fewer small kernels per layer.
                positions, padding = stream.position_ids, stream.padding
                cos, sin = rope_cos_sin(positions, self.sizes.head_dim, self.sizes.rope_theta, stream.hidden.dtype)
                mask = key_mask(padding, stream.hidden.device)
            stream.hidden, q, k, v = layer(stream.hidden, cos, sin, mask, causal, extra)
            if hooks.wants_kv(index):
                hooks.on_kv(index, stream, k, v)
            wants_qk = hooks.wants_qk(index)
            stream = hooks.after_layer(index, stream, q if wants_qk else None, k if wants_qk else None)
        if recorder is not None:
            recorder.write(traces)
        return self.model.norm(stream.hidden)


def key_mask(padding: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """SDPA boolean mask (B, 1, 1, T): True where a key may be attended to."""
    if padding is None:
        return None
    return (~padding)[:, None, None, :].to(device)


class _LayerCounts:
    """Token counts entering each layer, read back with one synchronisation at the end."""

    def __init__(self):
        self.per_layer: list[torch.Tensor | None] = []
        self.extra: list[torch.Tensor | None] = []
        self._masks = self._counts = None

    def record(self, stream: TokenStream, skipped: bool, extra: ExtraKeys | None = None) -> None:
        self.extra.append(None if extra is None else extra.counts())
        if skipped:
            self.per_layer.append(None)
            return
        masks = (stream.visual, stream.padding)
        if self._masks is None or any(a is not b for a, b in zip(masks, self._masks)):
            self._masks, self._counts = masks, stream.counts()
        self.per_layer.append(self._counts)

    def write(self, traces: list[QueryTrace]) -> None:
        computed = [c for c in self.per_layer if c is not None]
        values = iter(torch.stack(computed).tolist() if computed else [])
        for counts, extra in zip(self.per_layer, self.extra):
            tokens, visual = next(values) if counts is not None else (None, None)
            for i, trace in enumerate(traces):
                trace.llm_tokens.append(None if tokens is None else int(tokens[i]))
                trace.llm_visual_tokens.append(None if visual is None else int(visual[i]))
                reused = 0 if extra is None else int(extra[i])
                trace.llm_keys.append(None if tokens is None else int(tokens[i]) + reused)
