"""A Llama decoder, bidirectional by default, as OpenVLA-OFT runs it.

Parameter names follow transformers' ``LlamaForCausalLM`` (``model.layers.{i}.self_attn.q_proj``
...) so checkpoints load without renaming. RoPE takes explicit position ids, so tokens keep
their original positions after others are pruned. The vocabulary projection ``lm_head`` is
loaded (it is in the checkpoint) but never computed: the action head reads hidden states.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from policies.vla.config import LlamaSizes
from policies.vla.graphs import is_recording
from policies.vla.hooks import ExtraKeys, Hooks, QueriesKeys, QueryTrace, TokenStream


def weighted_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalised in fp32 and rounded to the input's dtype before the weight, as Llama does;
    # the unweighted F.rms_norm computes exactly that, in one kernel on a GPU instead of seven.
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """The residual sum and its normalisation."""
    x = x + delta
    return x, weighted_rms_norm(x, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and signed sin of shape (B, T, 1, head_dim), computed in fp32 (the half-split layout
    of Llama), for queries and keys laid out (B, T, heads, head_dim). The sin's first half is
    negated so that ``apply_rope`` needs no negation."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    sign = torch.ones(head_dim, device=position_ids.device)
    sign[: head_dim // 2] = -1
    return emb.cos().to(dtype)[:, :, None], (emb.sin() * sign).to(dtype)[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1): (x2, x1) times the signed
    sin, four kernels instead of five. Negation is exact, and each product is rounded on its
    own as in Llama's formula, so bf16 results equal it bit for bit (a fused multiply-add,
    rounding once, differed by one unit in a fifth of the values)."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return x * cos + swapped * signed_sin


class Kernels:
    """The LLM's element-wise chains: eager (one kernel per operator), or each compiled into one
    kernel by torch.compile (shapes dynamic, so new token counts do not recompile). Compiled
    chains may round bf16 intermediates differently from eager."""

    def __init__(self, compiled: bool = False):
        wrap = _compiled_in_graphs if compiled else (lambda fn: fn)
        self.compiled = compiled
        self.rms_norm = wrap(weighted_rms_norm)
        self.add_rms_norm = wrap(add_rms_norm)
        self.rope = wrap(apply_rope)
        self.silu_mul = wrap(silu_mul)


def _compiled_in_graphs(fn):
    """``fn`` compiled where a CUDA graph is being recorded, eager elsewhere (``graphs.recording``)."""
    compiled = torch.compile(fn, dynamic=True)

    def run(*args):
        return compiled(*args) if is_recording() else fn(*args)
    return run


EAGER = Kernels()


@functools.cache
def compiled_kernels() -> Kernels:
    """One compiled set per process, so that every model and query shares its compilations."""
    return Kernels(compiled=True)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels = EAGER

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)


# Below this many rows (tokens over the whole batch) the q, k, v products are bound by reading
# their weights, and one product over the three weights reads them faster (H100: about 300
# flops per weight byte balance its compute and memory; measured in docs/performance.md).
# The MLP's gate and up products fuse below the same count where the fuse_gate_up speedup is on.
FUSED_BELOW_TOKENS = 300


def fuse_weights(*linears: nn.Linear) -> torch.Tensor:
    """One weight holding the rows of ``linears``, which then view it (no second copy): one
    matrix product instead of several on the same input. Checkpoint names stay as they are."""
    fused = torch.cat([linear.weight.detach() for linear in linears])
    for linear, part in zip(linears, fused.split([linear.out_features for linear in linears])):
        linear.weight.data = part
    return fused


def fused_or_none(current: torch.Tensor | None, enabled: bool, *linears: nn.Linear) -> torch.Tensor | None:
    """The fused weight a module should hold: none when disabled (the projections keep viewing
    the fused storage), the one it has, or a new one."""
    if not enabled:
        return None
    return current if current is not None else fuse_weights(*linears)


class Attention(nn.Module):
    def __init__(self, sizes: LlamaSizes):
        super().__init__()
        d, hd = sizes.hidden_size, sizes.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = sizes.num_heads, sizes.num_kv_heads, hd
        self.q_proj = nn.Linear(d, sizes.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, sizes.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, sizes.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(sizes.num_heads * hd, d, bias=False)
        self.qkv_weight: torch.Tensor | None = None  # set by fuse_projections
        self.kernels = EAGER

    def fuse_projections(self, enabled: bool = True) -> None:
        self.qkv_weight = fused_or_none(self.qkv_weight, enabled, self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x, cos, sin, attn_mask, causal: bool, extra: ExtraKeys | None = None):
        b, t, _ = x.shape
        h, kvh, hd = self.num_heads, self.num_kv_heads, self.head_dim
        # RoPE in the (B, T, heads, hd) layout the products write: contiguous element-wise
        # kernels. Then (B, heads, T, hd) views for attention.
        if self.qkv_weight is not None and b * t < FUSED_BELOW_TOKENS:
            qkv = F.linear(x, self.qkv_weight).view(b, t, h + 2 * kvh, hd)
            q, k = self.kernels.rope(qkv[:, :, :h + kvh], cos, sin).split([h, kvh], dim=2)  # one RoPE for both
            v = qkv[:, :, h + kvh:]
        else:
            q, k = self.rotated(x, cos, sin)
            v = self.v_proj(x).view(b, t, kvh, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
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

    def rotated(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys after RoPE, (B, T, heads, hd), from separate products."""
        b, t, _ = x.shape
        q = self.kernels.rope(self.q_proj(x).view(b, t, self.num_heads, self.head_dim), cos, sin)
        k = self.kernels.rope(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        return q, k


def _extend_mask(attn_mask, extra: ExtraKeys, b: int, t: int, device) -> torch.Tensor | None:
    if attn_mask is None and extra.valid is None:
        return None
    own = attn_mask if attn_mask is not None else torch.ones(b, 1, 1, t, dtype=torch.bool, device=device)
    reused = extra.valid if extra.valid is not None else torch.ones(b, extra.k.shape[2], dtype=torch.bool, device=device)
    return torch.cat([own, reused.to(device)[:, None, None, :]], dim=-1)


class MLP(nn.Module):
    def __init__(self, sizes: LlamaSizes):
        super().__init__()
        self.gate_proj = nn.Linear(sizes.hidden_size, sizes.intermediate_size, bias=False)
        self.up_proj = nn.Linear(sizes.hidden_size, sizes.intermediate_size, bias=False)
        self.down_proj = nn.Linear(sizes.intermediate_size, sizes.hidden_size, bias=False)
        self.gate_up_weight: torch.Tensor | None = None  # set by fuse_projections
        self.kernels = EAGER

    def fuse_projections(self, enabled: bool = True) -> None:
        self.gate_up_weight = fused_or_none(self.gate_up_weight, enabled, self.gate_proj, self.up_proj)

    def forward(self, x):
        if self.gate_up_weight is not None and x.shape[:-1].numel() < FUSED_BELOW_TOKENS:
            # The halves are strided views: eager element-wise kernels on them are slower, so
            # this pays where the products dominate (few tokens).
            gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.kernels.silu_mul(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, sizes: LlamaSizes):
        super().__init__()
        self.self_attn = Attention(sizes)
        self.mlp = MLP(sizes)
        self.input_layernorm = RMSNorm(sizes.hidden_size, sizes.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(sizes.hidden_size, sizes.rms_norm_eps)

    def forward(self, x, cos, sin, attn_mask, causal: bool = False, extra: ExtraKeys | None = None):
        attn_out, q, k, v = self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, causal, extra)
        norm = self.post_attention_layernorm
        x, normed = norm.kernels.add_rms_norm(x, attn_out, norm.weight, norm.eps)
        x = x + self.mlp(normed)
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

    def use_kernels(self, kernels: Kernels) -> None:
        """Run the element-wise chains of every layer with ``kernels`` (eager or compiled)."""
        for module in self.modules():
            if hasattr(module, "kernels"):
                module.kernels = kernels

    def fuse_projections(self, enabled: bool = True) -> None:
        """q, k and v as one product when a batch has few tokens (``FUSED_BELOW_TOKENS``). For
        inference on the model's final device: the fused weights are not moved with the module."""
        for layer in self.model.layers:
            layer.self_attn.fuse_projections(enabled)

    def fuse_gate_up(self, enabled: bool = True) -> None:
        """The MLP's gate and up as one product when a batch has few tokens; as ``fuse_projections``."""
        for layer in self.model.layers:
            layer.mlp.fuse_projections(enabled)

    def forward(self, stream: TokenStream, hooks: Hooks | None = None, causal: bool = False,
                traces: list[QueryTrace] | None = None, graphs=None) -> torch.Tensor:
        """Final-norm hidden states (B, T', D) of the stream after every layer and hook.

        With ``graphs`` (``policies.vla.graphs.Graphs``), each run of layers where the hooks do
        nothing is replayed as one CUDA graph per sequence shape.
        """
        hooks = hooks or Hooks()
        stream = hooks.before_llm(stream)
        recorder = _LayerCounts() if traces is not None else None
        layers = self.model.layers
        positions = padding = cos = sin = mask = None
        index = 0
        while index < len(layers):
            if graphs is not None and hooks.plain_layer(index):
                end = index + 1
                while end < len(layers) and hooks.plain_layer(end):
                    end += 1
                if recorder is not None:
                    for _ in range(index, end):
                        recorder.record(stream, False)
                run = functools.partial(self.plain_layers, index, end, causal)
                stream.hidden = graphs.run(f"llm layers {index}-{end - 1} causal={causal}", run,
                                           stream.hidden, stream.position_ids, stream.padding)
                index = end
                continue
            # A plug-in may change the tokens before this layer, from the layer's own queries and
            # keys of them (computed only if it asks).
            queries_keys = QueriesKeys(functools.partial(self.queries_keys, index), self.sizes)
            stream = hooks.before_layer(index, stream, queries_keys)
            skipped = hooks.skip_layer(index)
            extra = None if skipped else hooks.extra_keys(index, stream)
            if recorder is not None:
                recorder.record(stream, skipped, extra)
            if skipped:
                index += 1
                continue
            wants_kv, wants_qk = hooks.wants_kv(index), hooks.wants_qk(index)
            if graphs is not None:  # this layer alone as a graph; the hooks act eagerly around it
                outputs = wants_kv or wants_qk
                run = functools.partial(self.one_layer, index, causal, outputs)
                extra_tensors = (None, None, None) if extra is None else (extra.k, extra.v, extra.valid)
                result = graphs.run(f"llm layer {index} causal={causal} outputs={outputs}", run,
                                    stream.hidden, stream.position_ids, stream.padding, *extra_tensors)
                stream.hidden, q, k, v = result if outputs else (result, None, None, None)
            else:
                if stream.position_ids is not positions or stream.padding is not padding:
                    # Recomputed only when a hook changed the tokens: fewer small kernels per layer.
                    positions, padding = stream.position_ids, stream.padding
                    cos, sin, mask = self.position_terms(stream.hidden, positions, padding, causal)
                stream.hidden, q, k, v = layers[index](stream.hidden, cos, sin, mask, causal, extra)
            if wants_kv:
                hooks.on_kv(index, stream, k, v)
            stream = hooks.after_layer(index, stream, q if wants_qk else None, k if wants_qk else None)
            index += 1
        if recorder is not None:
            recorder.write(traces)
        return self.model.norm(stream.hidden)

    def position_terms(self, hidden: torch.Tensor, position_ids: torch.Tensor, padding: torch.Tensor | None,
                       causal: bool = False):
        """RoPE cos and signed sin for the tokens' positions, and the attention mask of the padding."""
        cos, sin = rope_cos_sin(position_ids, self.sizes.head_dim, self.sizes.rope_theta, hidden.dtype)
        return cos, sin, key_mask(padding, hidden.device, causal)

    def queries_keys(self, index: int, hidden: torch.Tensor, position_ids: torch.Tensor):
        """Layer ``index``'s post-RoPE queries (B, H, T, hd) and keys (B, KVH, T, hd) of the
        tokens ``hidden`` at ``position_ids``: a pure function of its tensors (graphable)."""
        layer = self.model.layers[index]
        cos, sin = rope_cos_sin(position_ids, self.sizes.head_dim, self.sizes.rope_theta, hidden.dtype)
        q, k = layer.self_attn.rotated(layer.input_layernorm(hidden), cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2)

    def one_layer(self, index: int, causal: bool, outputs: bool, hidden: torch.Tensor, position_ids: torch.Tensor,
                  padding: torch.Tensor | None, extra_k: torch.Tensor | None, extra_v: torch.Tensor | None,
                  extra_valid: torch.Tensor | None):
        """Layer ``index`` as a pure function of its tensors (graphable): its hidden states, and
        with ``outputs`` its q, k, v for the hooks."""
        cos, sin, mask = self.position_terms(hidden, position_ids, padding, causal)
        extra = None if extra_k is None else ExtraKeys(extra_k, extra_v, extra_valid)
        result = self.model.layers[index](hidden, cos, sin, mask, causal, extra)
        return result if outputs else result[0]

    def plain_layers(self, start: int, end: int, causal: bool, hidden: torch.Tensor, position_ids: torch.Tensor,
                     padding: torch.Tensor | None) -> torch.Tensor:
        """Layers ``start`` to ``end - 1`` with no hook: a pure function of its tensors (graphable)."""
        cos, sin, mask = self.position_terms(hidden, position_ids, padding, causal)
        for layer in self.model.layers[start:end]:
            hidden = layer(hidden, cos, sin, mask, causal)[0]
        return hidden


def key_mask(padding: torch.Tensor | None, device: torch.device, causal: bool = False) -> torch.Tensor | None:
    """SDPA boolean mask, True where a key may be attended to: (B, 1, 1, T) for the padding, or
    (B, 1, T, T) when attention is also causal (SDPA's is_causal cannot be combined with a
    mask). A padding query attends to itself, so that no row is empty: an empty row is NaN,
    and NaN times a masked key's zero weight is NaN again."""
    if padding is None:
        return None
    keys = (~padding)[:, None, None, :].to(device)
    if not causal:
        return keys
    t = padding.shape[1]
    earlier = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    itself = torch.eye(t, dtype=torch.bool, device=device)
    return (keys & earlier) | itself


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
