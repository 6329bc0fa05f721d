"""The model core's hook points, and the record of what each query computed.

A plug-in (token pruning, caching, layer skipping) subclasses ``Hooks`` and overrides only
the points it needs; the defaults change nothing. The core never imports a plug-in.

The LLM's input travels as a ``TokenStream``: hidden states plus, per token, its RoPE
position, whether it is a visual patch, and whether it is padding (batches whose samples
keep different numbers of tokens are left-padded, so positions counted from the end of the
sequence, where the action slots are, stay valid).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from policies.vla.config import LlamaSizes


@dataclass(frozen=True)
class StreamSizes:
    """A stream's per-sample counts, on the host."""

    tokens: tuple[int, ...]  # real (not padding) tokens
    visual: tuple[int, ...]
    task: tuple[int, ...]


@dataclass
class TokenStream:
    hidden: torch.Tensor  # (B, T, D)
    position_ids: torch.Tensor  # (B, T) RoPE positions; keep_tokens keeps the original ones
    visual: torch.Tensor  # (B, T) bool: a visual patch token
    task: torch.Tensor  # (B, T) bool: a token after the visual block (proprio, prompt, action slots, stop)
    padding: torch.Tensor | None = None  # (B, T) bool: an empty slot, masked out as a key
    # The counts of the masks above, where whoever made the stream knew them (the assembly and
    # keep_tokens do); the masks must not change in place once they are set.
    sizes: StreamSizes | None = None

    def counts(self) -> torch.Tensor:
        """(2, B) on the masks' device: real tokens and real visual tokens per sample.

        Left on the device so that recording counts layer by layer costs no synchronisation.
        """
        real = self.real()
        return torch.stack([real.sum(dim=1), (self.visual & real).sum(dim=1)])

    def real(self) -> torch.Tensor:
        """(B, T) bool: a token that is not padding."""
        return ~self.padding if self.padding is not None else torch.ones_like(self.visual)

    def host_sizes(self) -> StreamSizes:
        """The per-sample counts on the host: known, or read back once (on a GPU, reading waits
        for every queued kernel, so plug-ins ask here rather than reading the masks)."""
        if self.sizes is None:
            self.sizes = read_sizes(self.real(), self.visual, self.task)
        return self.sizes


def read_sizes(real: torch.Tensor, visual: torch.Tensor, task: torch.Tensor) -> StreamSizes:
    """The counts of the (B, T) masks of real tokens and of the visual and task tokens among
    them, in one read-back."""
    return sizes_on_host(torch.stack([real.sum(dim=1), (visual & real).sum(dim=1), (task & real).sum(dim=1)]))


def sizes_on_host(counts: torch.Tensor) -> StreamSizes:
    """(3, B) counts of real, visual and task tokens per sample, read on the host at once."""
    tokens, visual, task = counts.tolist()
    return StreamSizes(tuple(tokens), tuple(visual), tuple(task))


def right_aligned(flags: torch.Tensor, longest: int) -> torch.Tensor:
    """(B, longest) column indices: each row's flagged columns in order, at the end of the row
    (a row with c flags has them in its last c places), given the most flags in a row. A stable
    sort of the flags puts the others first; nothing is read on the host."""
    t = flags.shape[1]
    return torch.sort(flags.to(torch.int8), dim=1, stable=True).indices[:, t - longest:]


@dataclass
class ExtraKeys:
    """Keys and values a layer attends to besides its own tokens' (reused from an earlier query)."""

    k: torch.Tensor  # (B, KVH, R, hd), RoPE already applied
    v: torch.Tensor  # (B, KVH, R, hd)
    valid: torch.Tensor | None = None  # (B, R) bool when samples hold different numbers

    def counts(self) -> torch.Tensor:
        if self.valid is None:
            return torch.full((self.k.shape[0],), self.k.shape[2], dtype=torch.long)
        return self.valid.sum(dim=1).cpu()


@dataclass(frozen=True)
class QueriesKeys:
    """A layer's post-RoPE queries (B, H, T, hd) and keys (B, KVH, T, hd) of given tokens:
    ``queries_keys(hidden, position_ids)``, a pure function of its tensors (so a plug-in may
    run it in a graph). Its two products are the plug-in's cost to report (``flops``)."""

    compute: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    sizes: LlamaSizes

    def __call__(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.compute(hidden, position_ids)

    def flops(self, tokens: int) -> int:
        s = self.sizes
        return 2 * tokens * s.hidden_size * (s.num_heads + s.num_kv_heads) * s.head_dim


@dataclass
class VisionSlots:
    """Tokens that replace a vision block's output: every image gets the same number S of slots.

    Differentiable selection (training) fills each slot with a weighted mix of patches; the
    slot takes the RoPE position of ``patches``, the patch it stands for (repeats allowed).
    """

    tokens: torch.Tensor  # (B*images, prefix + S, C), the tower's prefix tokens first
    patches: torch.Tensor  # (B*images, S) patch index of every slot


_LAYER_POINTS = ("before_layer", "skip_layer", "extra_keys", "wants_kv", "on_kv", "wants_qk", "after_layer")


class Hooks:
    """Hook points of the model core. Every default is the identity.

    A plug-in that computes something itself (scores, attention rows) reports those FLOPs
    per sample with ``add_cost`` so that a query's count stays complete.

    ``graphs`` is set by the core for each query: the model's CUDA graphs
    (``policies.vla.graphs.Graphs``) when it replays them, else None. A plug-in may run its
    own fixed-shape work through it.
    """

    graphs = None

    def plain_vision(self) -> bool:
        """Whether the vision towers run untouched (then the core may replay them as one graph)."""
        return type(self).on_vision_block is Hooks.on_vision_block

    def plain_vision_block(self, tower: int, block: int) -> bool:
        """Whether ``on_vision_block`` does nothing after this block of this tower, so the core
        may replay a run of such blocks as one graph. The default: whether the plug-in
        overrides ``on_vision_block``; plug-ins that act after a few blocks only say which."""
        return self.plain_vision()

    def plain_layer(self, layer: int) -> bool:
        """Whether LLM layer ``layer`` runs with no hook action: not skipped, no extra keys, no
        K/V or q/k wanted, ``after_layer`` the identity. The core may replay a run of plain
        layers as one graph. The default looks at which points a plug-in overrides; plug-ins
        that act at a few layers only say which."""
        return all(getattr(type(self), name) is getattr(Hooks, name) for name in _LAYER_POINTS)

    def reset(self) -> None:
        """A new episode starts (plug-ins with state across control steps clear it)."""

    def start(self, batch: int) -> None:
        """A query of ``batch`` samples starts."""
        self._cost = [0.0] * batch

    def add_cost(self, per_sample: list[float]) -> None:
        current = getattr(self, "_cost", None) or [0.0] * len(per_sample)
        self._cost = [a + float(b) for a, b in zip(current, per_sample)]

    def cost(self) -> list[float]:
        return list(getattr(self, "_cost", []))

    def on_vision_block(self, tower: int, block: int,
                        tokens: torch.Tensor) -> torch.Tensor | VisionSlots | None:
        """After vision block ``block`` of tower 0 (DINOv2) or 1 (SigLIP), tokens (B*images, N, C)
        with the tower's prefix tokens first: None to go on, a (B*images, P) bool mask of the
        patches to keep (the prefix tokens always stay), after which the tower runs image by
        image, or ``VisionSlots`` that replace the tokens (same count per image, so the batch
        stays whole). Both towers must keep the same patches: handing both the same mask
        object costs one read of its counts on the host instead of three."""
        return None

    def before_llm(self, stream: TokenStream) -> TokenStream:
        """Between the projector (plus proprio and prompt assembly) and LLM layer 0."""
        return stream

    def before_layer(self, layer: int, stream: TokenStream, queries_keys: QueriesKeys) -> TokenStream:
        """Before LLM layer ``layer`` (and after ``before_llm``), with the means to compute that
        layer's queries and keys of the tokens it is about to see."""
        return stream

    def skip_layer(self, layer: int) -> bool:
        return False

    def extra_keys(self, layer: int, stream: TokenStream) -> ExtraKeys | None:
        """Keys and values layer ``layer`` attends to in addition to the stream's own."""
        return None

    def wants_kv(self, layer: int) -> bool:
        """Whether ``on_kv`` should see this layer's keys and values (e.g. to cache them)."""
        return False

    def on_kv(self, layer: int, stream: TokenStream, k: torch.Tensor, v: torch.Tensor) -> None:
        """The stream's own post-RoPE keys and values (B, KVH, T, hd) at layer ``layer``."""

    def wants_qk(self, layer: int) -> bool:
        """Whether ``after_layer`` needs this layer's (post-RoPE) queries and keys."""
        return False

    def after_layer(self, layer: int, stream: TokenStream, q: torch.Tensor | None,
                    k: torch.Tensor | None) -> TokenStream:
        """After LLM layer ``layer``; q (B, H, T, hd) and k (B, KVH, T, hd) when asked for."""
        return stream


VISION_TOWERS = ("featurizer", "fused_featurizer")  # DINOv2, SigLIP: the checkpoint's names


@dataclass
class QueryTrace:
    """Token counts one sample's query went through: the input of every FLOP count and stat."""

    vision_tokens: list[list[list[int]]] = field(default_factory=list)  # tower -> block -> tokens per image
    projector_tokens: int = 0
    llm_tokens: list[int | None] = field(default_factory=list)  # per layer; None = layer skipped
    llm_visual_tokens: list[int | None] = field(default_factory=list)
    llm_keys: list[int | None] = field(default_factory=list)  # keys per layer (own tokens + reused)
    plugin_flops: float = 0.0  # what a plug-in computed itself (scoring, attention rows)

    @property
    def mean_visual_tokens(self) -> float | None:
        """Visual tokens entering an LLM layer, averaged over the layers that ran: the count
        progressive methods (FastV, SparseVLM) state their budgets in."""
        ran = [v for v in self.llm_visual_tokens if v is not None]
        return sum(ran) / len(ran) if ran else None

    def as_stats(self) -> dict:
        stats = {
            "visual_tokens_llm": self.llm_visual_tokens,
            "visual_tokens_mean": self.mean_visual_tokens,
            "tokens_llm": self.llm_tokens,
        }
        # Tokens entering each block of each vision tower (prefix tokens included), summed over
        # the sample's images; one key per tower, as their depths differ.
        for name, blocks in zip(VISION_TOWERS, self.vision_tokens):
            stats[f"tokens_vision_{name}"] = [sum(per_image) for per_image in blocks]
        return stats
