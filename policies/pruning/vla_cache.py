"""VLA-Cache: reuse the keys and values of static, task-irrelevant visual tokens across control steps.

Per episode, the cache keeps the previous query's image patches (copies, never views of the
current frame), every layer's keys and values of the visual tokens, and two readings of the
previous query's attention. What a query reuses follows the reference's OpenVLA-OFT
integration:

- Static: per camera image, the patches whose 14x14 8-bit RGB values have a cosine
  similarity >= ``similarity`` (0.996) with the previous frame's, at most the ``static`` (150)
  most similar (the reference compares the prepared 224x224 images).
- Task-relevant, never reused: per camera image, the ``relevant`` (100) patches the text
  tokens (the prompt, ``text_margins``; or with ``text_window`` = N the N tokens right after
  the visual block, as the reference) attended to most at ``relevance_layer`` (15 of 32) in
  the previous query, averaged over those tokens and heads. There the text rows attend to the
  tokens still in the sequence and to the reused ones' cached keys, as the layer itself does.
- Reusable: static and not relevant, in token order (first camera first), R of them.
- Layer schedule: the previous query's attention entropy of each layer (its head-averaged
  attention rows' entropies, averaged over rows), min-max normalised over the layers, gives
  ``p = 1 - normalised entropy``; a rise from one layer to the next is damped to ``growth``
  (0.55) of itself. At each stage layer l (2, 6, 9 and 11 of 32) the first
  ``max(1, int(p[l] * R))`` reusable tokens leave the sequence before layer l, unless an
  earlier stage took out more (then that count stays). Later layers attend to their cached
  keys and values instead (so they cost neither projections nor MLP there).

Nothing is reused at an episode's first query. Where this differs from the reference code:
- Its LIBERO loop hands the current frame over as the previous one (it appends the frame to
  its list, then takes the list's last entry), the aliasing bug the contract warns of: every
  patch then scores about 1.0, and its 150 static patches per camera are picked by rounding,
  not by motion. Ours compares with the previous query's frame, the one the cached keys and
  values were computed from.
- Its text rows are a fixed window of 34 positions after the visual block (the proprio
  token, the prompt and, for a prompt shorter than 33 tokens, the first action slots);
  ``text_window=34`` does the same, the default (0) takes the prompt's text tokens.
- It computes the attention maps as eager attention does (logits in the model's dtype, bf16,
  softmax in float32 rounded back to it) and its entropies and schedule in the model's
  dtype; ours are float32 unless ``entropy_dtype="model"``, which rounds as it does.

With OFT's bidirectional attention the cached keys and values were computed in the previous
step's context: reuse is an approximation, not an exact cache.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from policies.pruning.base import dropped_sizes, keep_tokens, per_query_head, rows_attention, text_counts
from policies.vla.hooks import ExtraKeys, Hooks, TokenStream, right_aligned

PATCH = 14
ENTROPY_DTYPES = ("float32", "model")
VISUAL_START = 1  # RoPE position of visual token 0 (BOS is position 0)


def patch_vectors(pixels: torch.Tensor, images: int,
                  levels: tuple[Sequence[float], Sequence[float]] | None = None) -> np.ndarray:
    """(6 * images, H, W) model input -> (images * patches, 14 * 14 * 3) float32 patch vectors of
    the first tower's channels, in the visual tokens' order, on the host (a new array).

    Each patch is flattened row by row with the channels last, as the reference flattens the
    prepared (224, 224, 3) image's blocks: numpy then sums in the same order, so the
    similarities equal the reference's bit for bit. With ``levels`` = (means, stds), the first
    tower's normalisation, the channels are turned back into the 8-bit values they were
    computed from: the reference's 0.996 threshold is meant for those (after subtracting the
    means, patches near the mean colour change direction with a one-level change).
    """
    per_image = pixels.reshape(images, 6, *pixels.shape[-2:])[:, :3].float()
    if levels is not None:
        means, stds = (torch.tensor(v, dtype=torch.float32, device=pixels.device)[None, :, None, None] for v in levels)
        per_image = ((per_image * stds + means) * 255.0).round()
    values = per_image.cpu().numpy()
    i, c, h, w = values.shape
    blocks = values.reshape(i, c, h // PATCH, PATCH, w // PATCH, PATCH).transpose(0, 2, 4, 3, 5, 1)
    return np.array(blocks.reshape(-1, PATCH * PATCH * c), dtype=np.float32, order="C")


def patch_similarity(now: np.ndarray, before: np.ndarray) -> np.ndarray:
    """Cosine similarity (P,) of two frames' patch vectors (P, N), as the reference computes it
    (float32, 1e-8 added to the product of the norms, so a black patch is never static)."""
    dot = np.sum(now * before, axis=1)
    return dot / (np.linalg.norm(now, axis=1) * np.linalg.norm(before, axis=1) + 1e-8)


def reusable_tokens(similarity: np.ndarray, relevance: np.ndarray, images: int, threshold: float,
                    static: int, relevant: int) -> np.ndarray:
    """(V,) bool: per image, the ``static`` most similar patches at or above ``threshold`` less
    the ``relevant`` most attended ones. Ties keep token order, as the reference's stable sorts."""
    sim, rel = similarity.reshape(images, -1), relevance.reshape(images, -1)
    is_static = sim >= threshold
    ranked = np.argsort(-np.where(is_static, sim, -np.inf), axis=1, kind="stable")[:, :static]
    chosen = np.zeros_like(is_static)
    np.put_along_axis(chosen, ranked, True, axis=1)
    np.put_along_axis(chosen, np.argsort(-rel, axis=1, kind="stable")[:, :relevant], False, axis=1)
    return (chosen & is_static).reshape(-1)


def layer_attention(q: torch.Tensor, keys: torch.Tensor, rounded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's head-averaged attention (T, K) of every row over ``keys``, twice: for the
    entropy and for the relevance. ``rounded``: as the reference's eager attention maps
    (logits in q's dtype, softmax in float32 rounded back to it), averaged over heads in q's
    dtype for the entropy and in float32 for the relevance, as it averages them."""
    if not rounded:
        attention = rows_attention(q, keys, None)[0]
        return attention, attention
    keys = per_query_head(keys, q.shape[1])
    logits = (q @ keys.to(q.dtype).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    probabilities = logits.softmax(dim=-1, dtype=torch.float32).to(q.dtype)[0]  # (H, T, K)
    return probabilities.mean(dim=0), probabilities.float().mean(dim=0)


def observed_attention(rounded: bool, relevance: bool, q: torch.Tensor, k: torch.Tensor,
                       extra_k: torch.Tensor | None):
    """A layer's attention entropy (0-d), and with ``relevance`` also its head-averaged rows
    for the relevance (T, K): every row over the layer's own keys ``k`` and the reused tokens'
    cached ones ``extra_k`` (``layer_attention``). A pure function of its tensors (graphable)."""
    keys = k if extra_k is None else torch.cat([k, extra_k.to(k.dtype)], dim=2)
    attention, for_relevance = layer_attention(q, keys, rounded)
    entropy = attention_entropy(attention)
    return (entropy, for_relevance) if relevance else entropy


def attention_entropy(attention: torch.Tensor) -> torch.Tensor:
    """Mean over rows of each row's entropy, for head-averaged attention rows (T, K), as the
    reference computes it (rows renormalised, 1e-10 inside the log)."""
    attention = attention / (attention.sum(dim=-1, keepdim=True) + 1e-10)
    return -(attention * torch.log(attention + 1e-10)).sum(dim=-1).mean()


def reuse_proportions(entropy: torch.Tensor) -> torch.Tensor:
    """Each layer's reuse proportion (L,) before damping: 1 - its min-max normalised attention
    entropy, computed in the entropies' dtype (the reference's: the model's)."""
    return 1.0 - (entropy - entropy.min()) / (entropy.max() - entropy.min() + 1e-10)


def reuse_schedule(proportions: Sequence[float], growth: float) -> np.ndarray:
    """The proportions (L,) with each rise from one layer to the next damped to ``growth`` of
    itself (in double, as the reference), as float32."""
    proportion = [float(p) for p in proportions]
    for i in range(1, len(proportion)):
        rise = proportion[i] - proportion[i - 1]
        if rise > 0:
            proportion[i] = proportion[i - 1] + rise * growth
    return np.asarray(proportion, dtype=np.float32)


def stage_counts(proportion: np.ndarray, stages: Sequence[int], reusable: int) -> list[tuple[int, int]]:
    """(stage layer, tokens reused from it on): ``max(1, int(p[l] * R))``, where an earlier stage
    that reused more keeps its count, as the reference applies a stage only if it reuses at least
    as many as the last one applied."""
    counts, last = [], 0
    for layer in stages:
        last = max(last, max(1, int(proportion[layer] * reusable)))
        counts.append((layer, last))
    return counts


@dataclass
class EpisodeCache:
    patches: np.ndarray  # previous query's patch vectors (a copy)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (KVH, V, hd)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    relevance: torch.Tensor | None = None  # (V,) text-token attention at the relevance layer
    entropy: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> its attention entropy (0-d)


class VLACache(Hooks):
    def __init__(self, similarity: float = 0.996, static: int = 150, relevant: int = 100,
                 layers: Sequence[int] = (2, 6, 9, 11), growth: float = 0.55, relevance_layer: int = 15,
                 images: int = 2, text_margins: tuple[int, int] = (0, 0),
                 levels: tuple[Sequence[float], Sequence[float]] | None = None, text_window: int = 0,
                 entropy_dtype: str = "float32"):
        if not layers or min(layers) < 1:
            raise ValueError(f"VLA-Cache's stage layers must be 1 or later (tokens leave before them), "
                             f"got {list(layers)}")
        self.similarity, self.static, self.relevant = similarity, static, relevant
        self.layers, self.growth = sorted(set(layers)), growth
        self.relevance_layer, self.images = relevance_layer, images
        self.text_margins = text_margins  # task tokens before and after the text (model.prompt_margins)
        self.text_window = text_window  # 0: the text rows are the prompt; N: the N tokens after the visual block
        if entropy_dtype not in ENTROPY_DTYPES:
            raise ValueError(f"entropy_dtype must be one of {', '.join(ENTROPY_DTYPES)}, got {entropy_dtype!r}")
        self.rounded = entropy_dtype == "model"  # attention maps, entropies and schedule rounded as the reference's
        self.levels = levels  # the first tower's (means, stds): patches compared as 8-bit values (patch_vectors)
        self.episodes: dict[str, EpisodeCache] = {}
        self.current: str | None = None
        self.reuse_order: torch.Tensor | None = None  # the reusable visual indices, in token order
        self.counts: list[tuple[int, int]] = []  # (stage layer, tokens reused from it on)
        self._slots: tuple | None = None  # the last stream's visual columns (see _visual_slots)
        self._extra: dict[int, ExtraKeys | None] = {}  # this query's reused keys and values per layer

    # --- per-episode state -------------------------------------------------------------
    def reset(self) -> None:
        self.episodes.clear()
        self._new_query(None)

    def forget(self, episode_id: str) -> None:
        self.episodes.pop(episode_id, None)
        if self.current == episode_id:  # a later query without begin() must not look for its cache
            self._new_query(None)

    def _new_query(self, episode_id: str | None) -> None:
        """Nothing of the last query's choice, columns or gathered keys carries over."""
        self.current, self.reuse_order, self.counts, self._slots, self._extra = episode_id, None, [], None, {}

    def begin(self, episode_id: str, pixels: torch.Tensor) -> None:
        """Called before each single-sample query with that sample's model input (6 * images, H, W)."""
        self._new_query(episode_id)
        patches = patch_vectors(pixels, self.images, self.levels)  # a new array: never a view of the frame
        cache = self.episodes.get(episode_id)
        if cache is None:
            self.episodes[episode_id] = EpisodeCache(patches)
            return
        self._choose(cache, patches)
        cache.patches = patches

    def _choose(self, cache: EpisodeCache, patches: np.ndarray) -> None:
        if not cache.keys or cache.relevance is None or not cache.entropy:
            return
        layers = sorted(cache.entropy)
        proportions = reuse_proportions(torch.stack([cache.entropy[layer] for layer in layers]))
        readings = torch.cat([proportions.float(), cache.relevance.float()]).cpu().numpy()  # the one host read
        reusable = reusable_tokens(patch_similarity(patches, cache.patches), readings[len(layers):], self.images,
                                   self.similarity, self.static, self.relevant)
        order = np.flatnonzero(reusable)  # in token order
        if not order.size:
            return
        self.reuse_order = torch.from_numpy(order).to(cache.relevance.device)
        stages = [layer for layer in self.layers if layer < len(layers)]
        self.counts = stage_counts(reuse_schedule(readings[:len(layers)], self.growth), stages, order.size)

    def reused_at(self, layer: int) -> int:
        """How many tokens layer ``layer`` reuses (the count of the last stage at or before it)."""
        return max((n for stage, n in self.counts if stage <= layer), default=0)

    @property
    def reused_tokens(self) -> int:
        """Visual tokens whose keys and values the current query reuses in its deepest layers."""
        return self.counts[-1][1] if self.counts else 0

    @property
    def reusable_tokens(self) -> int:
        """Static, task-irrelevant visual tokens of the current query (what the reference reports
        as its reuse ratio, over the visual tokens)."""
        return 0 if self.reuse_order is None else int(self.reuse_order.numel())

    # --- hook points ---------------------------------------------------------------------
    def wants_qk(self, layer: int) -> bool:
        return self.current is not None  # every layer's entropy schedules the next query

    def after_layer(self, layer, stream: TokenStream, q, k) -> TokenStream:
        if q is not None:
            self._observe(layer, stream, q, k)
        now, later = self.reused_at(layer), self.reused_at(layer + 1)
        if later == now:
            return stream
        leaving = self.reuse_order[now:later]
        visual_index = stream.position_ids[0] - VISUAL_START
        drop = stream.visual[0] & torch.isin(visual_index.to(stream.visual.device), leaving.to(stream.visual.device))
        # the leaving tokens are all still in the stream: its counts are known, nothing is read
        return keep_tokens(stream, ~drop[None], dropped_sizes(stream.host_sizes(), [later - now]))

    def extra_keys(self, layer: int, stream: TokenStream) -> ExtraKeys | None:
        """The reused tokens' cached keys and values at this layer, gathered once per query (the
        layer attends to them, and ``_observe`` then computes the layer's attention map with them;
        ``on_kv`` in between writes only the tokens still in the stream, never these)."""
        if layer in self._extra:
            return self._extra[layer]
        n = self.reused_at(layer)
        extra = None
        if n:
            cache = self.episodes[self.current]
            index = self.reuse_order[:n].to(cache.keys[layer].device)
            extra = ExtraKeys(cache.keys[layer][None, :, index], cache.values[layer][None, :, index])
        self._extra[layer] = extra
        return extra

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

    def _observe(self, layer: int, stream: TokenStream, q, k) -> None:
        """This layer's attention, as the layer computed it: every token in the sequence over
        its own keys and the reused tokens' cached ones (a query answers one sample: no
        padding). Its entropy schedules the next query; at the relevance layer, the text rows
        averaged give each visual token's relevance."""
        cache = self.episodes[self.current]
        extra = self.extra_keys(layer, stream)
        extra_k = None if extra is None else extra.k
        relevance = layer == self.relevance_layer
        # About 20 operators: with graphs, one replay per layer shape
        run = functools.partial(observed_attention, self.rounded, relevance)
        if self.graphs is None:
            observed = run(q, k, extra_k)
        else:
            observed = self.graphs.run(f"vla_cache attention rounded={self.rounded} relevance={relevance}", run,
                                       q, k, extra_k)
        keys = k.shape[2] + (0 if extra is None else extra.k.shape[2])
        self.add_cost([2 * q.shape[1] * q.shape[2] * keys * q.shape[3]])
        # the entropy in the dtype the schedule is computed in; the rows (T, own + reused keys)
        cache.entropy[layer], for_relevance = observed if relevance else (observed, None)
        if not relevance:
            return
        text_attention = for_relevance[self._text_rows(stream, q.shape[2])].mean(dim=0)
        columns, index = self._visual_slots(stream, q.device)
        relevance = text_attention.new_zeros(cache.patches.shape[0])
        relevance[index] = text_attention[columns]
        if extra is not None:
            relevance[self.reuse_order[:extra.k.shape[2]].to(relevance.device)] = text_attention[k.shape[2]:]
        cache.relevance = relevance

    def _text_rows(self, stream: TokenStream, length: int) -> slice:
        """The rows whose attention ranks relevance. Every task token follows the visual block
        and none ever leaves, so with one sample and no padding the rows are known on the host."""
        if self.text_window:
            first = length - stream.host_sizes().task[0]  # the first token after the visual block
            return slice(first, min(first + self.text_window, length))
        (text,) = text_counts(stream, self.text_margins)
        end = length - self.text_margins[1]
        return slice(end - text, end)
