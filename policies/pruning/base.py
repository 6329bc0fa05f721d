"""What every token-reduction plug-in shares: keeping a subset of the stream's tokens.

Plug-ins subclass ``policies.vla.hooks.Hooks``. The core records the tokens entering every
layer, so a plug-in only has to change the stream. ``keep_tokens`` drops tokens per sample
while keeping their order and original RoPE positions; samples that keep different counts
are left-padded, with the padding masked out as keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from policies.vla.hooks import StreamSizes, TokenStream, right_aligned, sizes_on_host


REFERENCE_DEPTH = 32  # the LLM depth (Llama-2 7B) the reference methods give their layers for


def parse_layers(text: str, lowest: int, highest: int, why: str) -> list[int]:
    """'2,6,15,19' -> [2, 6, 15, 19]: layers of the 32-layer reference, each in lowest..highest
    (``why`` says why, in the error)."""
    try:
        layers = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"layers must be comma-separated layer numbers, got {text!r}") from None
    if not all(lowest <= layer <= highest for layer in layers):
        raise ValueError(f"layers are given for a {REFERENCE_DEPTH}-layer LLM and must be in "
                         f"{lowest}..{highest} ({why}), got {text!r}")
    return layers


def parse_numbers(text: str, name: str, what: str) -> list[float]:
    """'0.5,0.25' -> [0.5, 0.25]; the option's ``name`` and ``what`` its numbers are, in the error."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated {what}, got {text!r}") from None


def scale_layer(layer: int, num_layers: int, lowest: int, highest: int) -> int:
    """A reference layer placed at the same relative depth of a ``num_layers`` LLM, clamped to
    lowest..highest."""
    return min(max(round(layer * num_layers / REFERENCE_DEPTH), lowest), highest)


def scale_layers(layers: Sequence[int], num_layers: int, lowest: int, highest: int) -> list[int]:
    """``scale_layer`` of each of the reference's layers; layers that land on one merge."""
    return sorted({scale_layer(layer, num_layers, lowest, highest) for layer in layers})


def keep_tokens(stream: TokenStream, keep: torch.Tensor, sizes: StreamSizes | None = None) -> TokenStream:
    """The stream restricted to tokens where ``keep`` (B, T) is true, left-padded to the longest
    sample. Its new length is read on the host, together with the new stream's counts, unless
    the caller knows those counts (``sizes``, see ``dropped_sizes``)."""
    order, masks = kept_layout(keep, stream.visual, stream.task, stream.padding)
    return take_kept(stream, order, masks, sizes or sizes_on_host(kept_counts(masks)))


def kept_layout(keep: torch.Tensor, visual: torch.Tensor, task: torch.Tensor,
                padding: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed-shape part of ``keep_tokens``, which reads nothing on the host, so a graph can
    hold it: the (B, T) order that puts each sample's kept tokens last, in order, and the
    (B, 3, T) masks of the kept tokens, the kept visual tokens and the kept task tokens."""
    if padding is not None:
        keep = keep & ~padding
    return right_aligned(keep, keep.shape[1]), torch.stack([keep, visual & keep, task & keep], dim=1)


def kept_counts(masks: torch.Tensor) -> torch.Tensor:
    """(3, B) counts of ``kept_layout``'s masks: kept tokens, kept visual and kept task tokens."""
    return masks.sum(dim=2).T


def take_kept(stream: TokenStream, order: torch.Tensor, masks: torch.Tensor, sizes: StreamSizes) -> TokenStream:
    """The kept tokens of ``stream`` (``kept_layout``'s order and masks, the counts ``sizes``):
    the gathers whose shapes depend on the kept counts."""
    longest = max(sizes.tokens)
    tail = order[:, order.shape[1] - longest:]
    kept = masks.gather(2, tail[:, None].expand(-1, masks.shape[1], -1))
    device = stream.hidden.device
    return TokenStream(
        hidden=stream.hidden.gather(1, tail.to(device)[..., None].expand(-1, -1, stream.hidden.shape[2])),
        position_ids=stream.position_ids.gather(1, tail.to(stream.position_ids.device)),
        visual=kept[:, 1],
        task=kept[:, 2],
        padding=None if min(sizes.tokens) == longest else ~kept[:, 0],
        sizes=sizes,
    )


def chosen_keep(visual: torch.Tensor, columns: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: every token but the visual ones, and the chosen visual tokens (``chosen``
    (B, V) over the visual ``columns``)."""
    return (~visual).scatter_(1, columns, chosen.to(visual.device))


def keep_chosen(stream: TokenStream, columns: torch.Tensor, chosen: torch.Tensor,
                sizes: StreamSizes | None = None) -> TokenStream:
    """The stream with only the chosen visual tokens (``chosen`` (B, V) over ``columns``) and all
    others; ``sizes`` as for ``keep_tokens``."""
    return keep_tokens(stream, chosen_keep(stream.visual, columns, chosen), sizes)


POSITIONS = ("renumber", "keep")  # after a plug-in drops tokens: RoPE positions 0, 1, ... again, or the original ones


def renumbered(stream: TokenStream) -> TokenStream:
    """The stream with its real tokens at RoPE positions 0, 1, ... in sequence order (padding at 0)."""
    positions = (stream.real().long().cumsum(dim=1) - 1).clamp(min=0)
    return TokenStream(stream.hidden, positions.to(stream.position_ids.device), stream.visual, stream.task,
                       stream.padding, stream.sizes)


def dropped_sizes(sizes: StreamSizes, dropped: Sequence[int]) -> StreamSizes:
    """The counts of a stream from which each sample drops ``dropped[b]`` visual tokens."""
    return StreamSizes(tuple(t - d for t, d in zip(sizes.tokens, dropped)),
                       tuple(v - d for v, d in zip(sizes.visual, dropped)), sizes.task)


def lowest_visual(scores: torch.Tensor, visual: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the ``drop[b]`` visual tokens of lowest score in each sample."""
    ranked = scores.masked_fill(~visual, float("inf")).argsort(dim=1)
    positions = torch.arange(ranked.shape[1], device=ranked.device).expand_as(ranked)
    rank = torch.empty_like(ranked).scatter_(1, ranked, positions)
    return (rank < drop[:, None]) & visual


def visual_block(stream: TokenStream) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V, D) visual tokens and their (B, V) column indices, for a stream whose samples
    all hold the same number V of visual tokens (before any pruning)."""
    return visual_tokens(stream.hidden, stream.visual, visual_count(stream))


def visual_count(stream: TokenStream) -> int:
    """The number of visual tokens every sample of ``stream`` holds (an error if they differ)."""
    counts = set(stream.host_sizes().visual)
    if len(counts) != 1:
        raise ValueError(f"the samples hold different numbers of visual tokens {sorted(counts)}: "
                         "this selection needs the whole visual block of each")
    return counts.pop()


def visual_tokens(hidden: torch.Tensor, visual: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``visual_block`` from the hidden states and the visual mask, given the count: no host read."""
    columns = right_aligned(visual, count)
    index = columns.to(hidden.device)
    return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[2])), columns


def task_block(stream: TokenStream) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """(B, n, D) last-n tokens covering every sample's task tokens, the (B, n) mask of which are
    task tokens (None when all are), and each sample's task-token count."""
    counts = list(stream.host_sizes().task)
    return task_tokens(stream.hidden, stream.task, max(counts), min(counts) != max(counts)) + (counts,)


def task_tokens(hidden: torch.Tensor, task: torch.Tensor, n: int,
                masked: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``task_block`` from the hidden states and the task mask, given the most task tokens of a
    sample and whether some samples have fewer: no host read."""
    return hidden[:, -n:], (task[:, -n:] if masked else None)


def text_counts(stream: TokenStream, margins: tuple[int, int]) -> list[int]:
    """Each sample's text tokens: its task tokens less ``margins`` = (tokens before the text,
    tokens after it). Samples are left-padded, so every sample's text ends at the same place."""
    before, after = margins
    counts = [task - before - after for task in stream.host_sizes().task]
    if min(counts) < 1:
        raise ValueError(f"a sample has no text tokens among its task tokens {stream.host_sizes().task} "
                         f"less {before} before and {after} after the text")
    return counts


def text_rows(q: torch.Tensor, stream: TokenStream, margins: tuple[int, int]) -> tuple[torch.Tensor, list[int]]:
    """Query rows (B, H, M, hd) covering every sample's text tokens (``text_counts``), and each
    sample's count: sample b's are the last of the M."""
    counts = text_counts(stream, margins)
    t, longest, after = q.shape[2], max(counts), margins[1]
    return q[:, :, t - after - longest:t - after], counts


def on_meta(t: torch.Tensor) -> bool:
    """The meta device (cost counting) has shapes but no values: selections become placeholders."""
    return t.device.type == "meta"


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm without a weight, computed in fp32, returned in the input's dtype."""
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=eps)


def last_token_attention(q: torch.Tensor, k: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """Attention of the last token over all keys, averaged over heads: (B, T).

    Computed from one query row, so the layer itself keeps using fused SDPA.
    """
    return rows_attention(q[:, :, -1:], k, padding).squeeze(1)


def per_query_head(k: torch.Tensor, heads: int) -> torch.Tensor:
    """Keys (B, KVH, T, hd) repeated to one head per query head (grouped key/value heads)."""
    return k if k.shape[1] == heads else k.repeat_interleave(heads // k.shape[1], dim=1)


def rows_attention(q_rows: torch.Tensor, k: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """Head-averaged attention (B, R, T) of the query rows q_rows (B, H, R, hd) over all keys."""
    k = per_query_head(k, q_rows.shape[1])
    scores = (q_rows.float() @ k.float().transpose(-1, -2)) / math.sqrt(q_rows.shape[-1])
    if padding is not None:
        scores = scores.masked_fill(padding.to(scores.device)[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1).mean(dim=1)
