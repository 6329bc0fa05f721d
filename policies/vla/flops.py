"""Analytic FLOPs of one query, from the token counts it went through.

Counted: every matrix product the code runs (linear layers, the patch-embedding
convolution, attention's two products), a multiply-add being 2 FLOPs; the same scope as
``torch.utils.flop_counter.FlopCounterMode``. Not counted: norms, activations, RoPE,
softmax, embedding lookups (elementwise, a fraction of a percent). The LM head's vocabulary
projection is not counted because the model does not compute it.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.vla.hooks import QueryTrace


@dataclass(frozen=True)
class TowerDims:
    name: str
    embed_dim: int
    mlp_dim: int
    patch_flops_per_token: int  # 2 * in_channels * patch area * embed_dim
    patches: int  # per image
    prefix_tokens: int  # class token and registers, per image
    blocks_run: int  # blocks computed: through the second-to-last


@dataclass(frozen=True)
class ModelDims:
    towers: tuple[TowerDims, TowerDims]
    vision_dim: int
    projector_dims: tuple[tuple[int, int], ...]
    proprio_dims: tuple[tuple[int, int], ...]
    hidden: int
    q_dim: int
    kv_dim: int
    intermediate: int
    head_dims: tuple[tuple[int, int], ...]
    chunk_length: int
    num_images: int


def model_dims(model) -> ModelDims:
    """Read the sizes off a built model (works on the meta device)."""
    towers = []
    for name, tower in zip(("dinov2", "siglip"), model.vision_backbone.towers):
        conv = tower.patch_embed.proj
        towers.append(TowerDims(
            name=name,
            embed_dim=tower.embed_dim,
            mlp_dim=tower.blocks[0].mlp.fc1.out_features,
            patch_flops_per_token=2 * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels,
            patches=tower.patch_embed.num_patches,
            prefix_tokens=tower.num_prefix_tokens,
            blocks_run=len(tower.blocks) - 1,
        ))
    attn = model.language_model.model.layers[0].self_attn
    mlp = model.language_model.model.layers[0].mlp
    head = model.action_head.model
    lin = lambda m: (m.in_features, m.out_features)  # noqa: E731
    return ModelDims(
        towers=tuple(towers),
        vision_dim=model.vision_backbone.embed_dim,
        projector_dims=tuple(lin(m) for m in (model.projector.fc1, model.projector.fc2, model.projector.fc3)),
        proprio_dims=tuple(lin(m) for m in (model.proprio_projector.fc1, model.proprio_projector.fc2)),
        hidden=attn.q_proj.in_features,
        q_dim=attn.q_proj.out_features,
        kv_dim=attn.k_proj.out_features,
        intermediate=mlp.gate_proj.out_features,
        head_dims=(lin(head.fc1),) + tuple(lin(b.ffn[1]) for b in head.mlp_resnet_blocks) + (lin(head.fc2),),
        chunk_length=model.config.chunk_length,
        num_images=model.config.num_images,
    )


def _linear(dims: tuple[tuple[int, int], ...], tokens: int) -> float:
    return float(sum(2 * tokens * i * o for i, o in dims))


def tower_flops(tower: TowerDims, block_tokens: list[list[int]], images: int) -> float:
    """One tower over all images: patch embedding plus each computed block at the tokens each image had."""
    d, h = tower.embed_dim, tower.mlp_dim
    total = float(images * tower.patches * tower.patch_flops_per_token)
    for per_image in block_tokens:
        for n in per_image:
            total += 2 * n * (3 * d * d + d * d + 2 * d * h)  # qkv, proj, fc1, fc2
            total += 4 * n * n * d  # scores and mixing
    return total


def llm_layer_flops(dims: ModelDims, n: int, keys: int | None = None) -> tuple[float, float]:
    """(linear, attention) FLOPs of one decoder layer over n tokens attending to ``keys`` keys
    (n unless keys are reused from an earlier query)."""
    d = dims.hidden
    keys = n if keys is None else keys
    linear = 2 * n * (d * dims.q_dim + 2 * d * dims.kv_dim + dims.q_dim * d + 3 * d * dims.intermediate)
    attention = 4 * n * keys * dims.q_dim
    return float(linear), float(attention)


def query_flops(dims: ModelDims, trace: QueryTrace) -> dict[str, float]:
    """FLOPs of one sample's query by component, plus ``total``."""
    out = {}
    for tower, counts in zip(dims.towers, trace.vision_tokens):
        out[f"vision_{tower.name}"] = tower_flops(tower, counts, dims.num_images)
    out["projector"] = _linear(dims.projector_dims, trace.projector_tokens)
    out["proprio_projector"] = _linear(dims.proprio_dims, 1)
    linear = attention = 0.0
    keys = trace.llm_keys or [None] * len(trace.llm_tokens)
    for n, m in zip(trace.llm_tokens, keys):
        if n is not None:
            lin, att = llm_layer_flops(dims, n, m)
            linear, attention = linear + lin, attention + att
    out["llm_linear"] = linear
    out["llm_attention"] = attention
    out["action_head"] = _linear(dims.head_dims, dims.chunk_length)
    if trace.plugin_flops:
        out["plugin"] = float(trace.plugin_flops)
    out["total"] = float(sum(out.values()))
    return out


def unpruned_trace(dims: ModelDims, prompt_tokens: int, layers: int, action_tokens: int) -> QueryTrace:
    """The trace of a query that prunes nothing, for a prompt of ``prompt_tokens`` (BOS included)."""
    visual = dims.num_images * dims.towers[0].patches
    vision = [[[t.patches + t.prefix_tokens] * dims.num_images] * t.blocks_run for t in dims.towers]
    n = 1 + visual + 1 + (prompt_tokens - 1) + action_tokens + 1
    return QueryTrace(vision_tokens=vision, projector_tokens=visual, llm_tokens=[n] * layers,
                      llm_visual_tokens=[visual] * layers)


def counted_flops(fn, *args, **kwargs) -> tuple[object, dict[str, float]]:
    """Run ``fn`` under ``FlopCounterMode``: (result, FLOPs by aten op, plus ``total``).

    Attention runs on SDPA's math backend here, whose matrix products the counter sees
    (the counter has no formula for the fused CPU kernel); results are the same.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.inference_mode():
        result = fn(*args, **kwargs)
    by_op = {str(op): float(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    by_op["total"] = float(counter.get_total_flops())
    return result, by_op
