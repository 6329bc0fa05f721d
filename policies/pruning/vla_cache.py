"""VLA-Cache: reuse the keys and values of static, task-irrelevant visual tokens across control steps.

Per episode, the cache keeps the previous query's image patches (copies, never views of
the current frame), every layer's keys and values of the 512 visual tokens, and how much
the text tokens (the prompt, ``text_margins``) attended to each visual token. At the next
query a visual token is reused when its 14x14 pixel patch is nearly unchanged (cosine
similarity of the 8-bit RGB values >= ``similarity``, as the reference compares the prepared
224x224 images; at most ``max_reuse`` tokens, most similar first) and it is not
among the ``relevant`` fraction the text tokens attended to most at ``relevance_layer`` in the
previous query (the reference reads layer 15 of 32; there the text rows attend to the tokens
still in the sequence and to the reused ones' cached keys, as the layer itself does). A reused token leaves the sequence from layer ``first_layer``
on; later layers attend to its cached keys and values instead (so it costs neither
projections nor MLP there). The reuse is layer-adaptive: the number of reused tokens grows
linearly over ``ramp`` layers from ``first_layer`` (the published method sets per-layer
ratios from attention entropy; this is a fixed schedule). Nothing is reused at an
episode's first query.

With OFT's bidirectional attention the cached keys and values were computed in the
previous step's context: reuse is an approximation, not an exact cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from policies.pruning.base import keep_tokens, rows_attention, text_rows
from policies.vla.hooks import ExtraKeys, Hooks, TokenStream, right_aligned

PATCH = 14
VISUAL_START = 1  # RoPE position of visual token 0 (BOS is position 0)


def patch_vectors(pixels: torch.Tensor, images: int,
                  levels: tuple[Sequence[float], Sequence[float]] | None = None) -> torch.Tensor:
    """(6 * images, H, W) model input -> (images * patches, 3 * 14 * 14) patch vectors of the
    first tower's channels, in the visual tokens' order.

    With ``levels`` = (means, stds), the first tower's normalisation, the channels are turned
    back into the 8-bit values they were computed from: a cosine similarity threshold such as
    the reference's 0.996 is meant for those (after subtracting the means, patches near the
    mean colour change direction with a one-level change).
    """
    per_image = pixels.reshape(images, 6, *pixels.shape[-2:])[:, :3].float()
    if levels is not None:
        means, stds = (torch.tensor(v, dtype=torch.float32, device=pixels.device)[None, :, None, None] for v in levels)
        per_image = ((per_image * stds + means) * 255.0).round()
    patches = per_image.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # (I, 3, h, w, 14, 14)
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * PATCH * PATCH)


@dataclass
class EpisodeCache:
    patches: torch.Tensor  # previous query's patch vectors (a copy)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (KVH, V, hd)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    relevance: torch.Tensor | None = None  # (V,) task-token attention at the relevance layer


class VLACache(Hooks):
    def __init__(self, similarity: float = 0.996, max_reuse: int = 128, relevant: float = 0.25,
                 first_layer: int = 2, ramp: int = 4, relevance_layer: int = 1, images: int = 2,
                 text_margins: tuple[int, int] = (0, 0),
                 levels: tuple[Sequence[float], Sequence[float]] | None = None):
        self.similarity, self.max_reuse, self.relevant = similarity, max_reuse, relevant
        self.first_layer, self.ramp, self.relevance_layer, self.images = first_layer, ramp, relevance_layer, images
        self.text_margins = text_margins  # task tokens before and after the text (model.prompt_margins)
        self.levels = levels  # the first tower's (means, stds): patches compared as 8-bit values (patch_vectors)
        self.episodes: dict[str, EpisodeCache] = {}
        self.current: str | None = None
        self.reuse_order: torch.Tensor | None = None  # visual indices to reuse, most static first
        self._slots: tuple | None = None  # the last stream's visual columns (see _visual_slots)

    # --- per-episode state -------------------------------------------------------------
    def reset(self) -> None:
        self.episodes.clear()
        self.current, self.reuse_order, self._slots = None, None, None

    def forget(self, episode_id: str) -> None:
        self.episodes.pop(episode_id, None)
        if self.current == episode_id:  # a later query without begin() must not look for its cache
            self.current, self.reuse_order, self._slots = None, None, None

    def begin(self, episode_id: str, pixels: torch.Tensor) -> None:
        """Called before each single-sample query with that sample's model input (6 * images, H, W)."""
        self.current = episode_id
        self._slots = None
        patches = patch_vectors(pixels, self.images, self.levels)
        cache = self.episodes.get(episode_id)
        self.reuse_order = None if cache is None else self._choose(cache, patches)
        if cache is None:
            cache = self.episodes[episode_id] = EpisodeCache(patches.clone())
        else:
            cache.patches = patches.clone()

    def _choose(self, cache: EpisodeCache, patches: torch.Tensor) -> torch.Tensor | None:
        if not cache.keys or cache.relevance is None:
            return None
        sim = torch.nn.functional.cosine_similarity(patches, cache.patches.to(patches.device), dim=1)
        candidate = sim >= self.similarity
        relevant = cache.relevance.topk(int(self.relevant * sim.numel())).indices
        candidate[relevant.to(candidate.device)] = False
        order = torch.argsort(sim.masked_fill(~candidate, -2.0), descending=True)
        return order[: min(self.max_reuse, int(candidate.sum()))]

    def reused_at(self, layer: int) -> int:
        """How many tokens are reused at ``layer`` (0 before first_layer, then a linear ramp)."""
        if self.reuse_order is None or layer < self.first_layer:
            return 0
        fraction = min(1.0, (layer - self.first_layer + 1) / self.ramp)
        return int(round(fraction * self.reuse_order.numel()))

    # --- hook points ---------------------------------------------------------------------
    def after_layer(self, layer, stream: TokenStream, q, k) -> TokenStream:
        if q is not None and layer == self.relevance_layer:
            self._store_relevance(layer, stream, q, k)
        now, later = self.reused_at(layer), self.reused_at(layer + 1)
        if later == now:
            return stream
        leaving = self.reuse_order[now:later]
        visual_index = stream.position_ids[0] - VISUAL_START
        drop = stream.visual[0] & torch.isin(visual_index.to(stream.visual.device), leaving.to(stream.visual.device))
        return keep_tokens(stream, ~drop[None])

    def wants_qk(self, layer: int) -> bool:
        return layer == self.relevance_layer and self.current is not None

    @property
    def reused_tokens(self) -> int:
        """Visual tokens whose keys and values the current query reuses (in its deepest layers)."""
        return 0 if self.reuse_order is None else int(self.reuse_order.numel())

    def extra_keys(self, layer: int, stream: TokenStream) -> ExtraKeys | None:
        n = self.reused_at(layer)
        if not n:
            return None
        cache = self.episodes[self.current]
        index = self.reuse_order[:n].to(cache.keys[layer].device)
        return ExtraKeys(cache.keys[layer][None, :, index], cache.values[layer][None, :, index])

    def wants_kv(self, layer: int) -> bool:
        return self.current is not None

    def on_kv(self, layer: int, stream: TokenStream, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the recomputed visual tokens' keys and values (copies) for the next query."""
        cache = self.episodes[self.current]
        columns, index = self._visual_slots(stream, k.device)
        if layer not in cache.keys:
            visual = cache.patches.shape[0]  # every visual token of the episode's frames
            cache.keys[layer] = k.new_zeros(k.shape[1], visual, k.shape[3])
            cache.values[layer] = v.new_zeros(v.shape[1], visual, v.shape[3])
        cache.keys[layer][:, index] = k[0][:, columns]
        cache.values[layer][:, index] = v[0][:, columns]

    def _visual_slots(self, stream: TokenStream, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The stream's visual columns and their patch indices, kept while the stream's mask
        and positions are the same: the tokens change only where some leave."""
        slots = self._slots
        if slots is None or slots[0] is not stream.visual or slots[1] is not stream.position_ids:
            columns = right_aligned(stream.visual, stream.host_sizes().visual[0])[0].to(device)
            index = stream.position_ids[0].to(device)[columns] - VISUAL_START
            slots = self._slots = (stream.visual, stream.position_ids, columns, index)
        return slots[2], slots[3]

    def _store_relevance(self, layer: int, stream: TokenStream, q, k) -> None:
        """Each visual token's attention from the text tokens at this layer, averaged over them:
        the tokens in the sequence through their own keys, the reused ones through the cached keys
        the layer attended to (a query answers one sample: no padding)."""
        cache = self.episodes[self.current]
        q_text, (text,) = text_rows(q, stream, self.text_margins)
        columns, index = self._visual_slots(stream, q.device)
        extra = self.extra_keys(layer, stream)
        keys = k if extra is None else torch.cat([k, extra.k.to(k.dtype)], dim=2)
        attention = rows_attention(q_text, keys, None)[0].mean(dim=0)  # (own + reused keys,)
        self.add_cost([2 * text * keys.shape[2] * q.shape[1] * q.shape[3]])
        relevance = attention.new_zeros(cache.patches.shape[0])
        relevance[index] = attention[columns]
        if extra is not None:
            relevance[self.reuse_order[:extra.k.shape[2]].to(relevance.device)] = attention[k.shape[2]:]
        cache.relevance = relevance
