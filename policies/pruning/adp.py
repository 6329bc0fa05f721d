"""ADP, Action-aware Dynamic Pruning: text-relevant visual tokens kept before LLM layer 0, on
the queries that the end effector's motion selects.

As the reference (the authors' OpenVLA-OFT integration: its model file's selection and its
LIBERO loop's online controller) does it, with its released configuration's values:

Selection, on a query that prunes:
- Importance of visual token j: the mean, over heads h and query rows r, of
  ``q[h, r] . k[h, j] / sqrt(head_dim)``, raw logits (no softmax). q and k are layer 0's own
  projections of layer 0's RMSNorm of the embeddings, without RoPE (the scores depend on
  content only). Query rows: BOS, the prompt and the stop token; not the proprio token, not
  the action slots.
- ``round(ratio * V)`` tokens are kept (ratio 0.75: 384 of 512), or ``keep``, shared among the
  camera images by ``split`` (0.4 for the third-person image, 0.6 for the wrist image: 154 and
  230), each image keeping its most important tokens. An image's share is rounded, the
  rounding remainder goes to the images of largest share first, and a share above the
  image's patches is cut to them, as in the reference (ratio 1 selects nothing). With one
  image the query keeps its most important tokens overall.
- Kept tokens stay in their order. The reference's forward gets no position ids, so RoPE
  positions are renumbered (``positions=renumber``); ``positions=keep`` keeps the original ones.

The gate (``gate=motion``), one per episode, from the end effector's position (the first
three proprio values), seen at each query: ``d`` is the net displacement over the chunk just
executed (the position now less the one at the previous query).
- ``decision=extrema`` (the released configuration): once ``window`` displacements are known,
  a query prunes when the last is at least the largest of the ``window - 1`` before it, keeps
  every token when it is below their smallest, and in between prunes (``last_state``: does what
  the previous query did). Before that, and at an episode's first query, the ``initial`` state
  (0: every token).
- ``decision=avg``: a running mean (the first displacement, then the mean of it and each new
  one); a query prunes when the last displacement is at least the mean.
- At most ``max_pruned`` queries in a row prune (3, the reference's default; 0: no limit);
  the next keeps every token.
- ``gate=static`` prunes every query, as the reference without its dynamic strategy.
With the defaults, an episode's first three queries keep every token.

Differences from the reference code:
- Scores are computed in float32 from the model's q and k (the reference: bf16 logits and
  mean, ranked on the host), so near ties may go the other way.
- The reference can score at a later layer (``qk_layer > 0``) after a whole extra forward
  of the unpruned sequence; its released configuration scores at layer 0, the only choice here.
- Only the net displacement: the reference's path-length variants need the position after
  every step, and a policy sees it at its queries only. Options the reference reads but never
  uses (lookback, L_eff, rotation and hysteresis thresholds) are left out.
- With one image the reference keeps tokens in score order; here they stay in their order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from policies.pruning.base import (POSITIONS, dropped_sizes, keep_chosen, on_meta, per_query_head, renumbered,
                                   text_counts, visual_block)
from policies.vla.hooks import Hooks, QueriesKeys, TokenStream

DECISIONS = ("extrema", "avg")
GATES = ("motion", "static")


def split_counts(total: int, weights: Sequence[float]) -> list[int]:
    """Each image's share of ``total`` kept tokens, as the reference rounds and corrects them."""
    n = len(weights)
    norm = [w / sum(weights) for w in weights]
    counts = [max(1, int(round(total * p))) for p in norm]
    diff = total - sum(counts)
    order = sorted(range(n), key=lambda i: norm[i], reverse=True)  # stable: equal shares in image order
    step = 0
    while diff != 0:
        i = order[step % n]
        if diff > 0:
            counts[i] += 1
            diff -= 1
        elif counts[i] > 1:
            counts[i] -= 1
            diff += 1
        step += 1
    return counts


def image_weights(split: Sequence[float], images: int) -> list[float]:
    """The split for ``images`` camera images: one weight each, or (third-person, wrist) with
    the wrist weight shared among all images after the first, as the reference does."""
    if len(split) == images:
        return list(split)
    if len(split) == 2 and images > 2:
        return [split[0]] + [split[1] / (images - 1)] * (images - 1)
    raise ValueError(f"split needs one weight per camera image ({images}), got {list(split)}")


@dataclass
class MotionGate:
    """One episode's choice, query by query, between pruning and every token."""

    decision: str = "extrema"
    window: int = 3
    initial: int = 0
    last_state: bool = False
    max_pruned: int = 3
    state: int = field(init=False)
    streak: int = field(init=False)  # queries in a row that pruned
    history: list[float] = field(init=False, default_factory=list)
    average: float | None = field(init=False, default=None)
    position: np.ndarray | None = field(init=False, default=None)

    def __post_init__(self):
        self.state = self.initial
        self.streak = 1 if self.initial == 1 and self.max_pruned else 0

    def prunes(self, position: np.ndarray) -> bool:
        """Whether the query with the end effector at ``position`` prunes."""
        position = np.asarray(position, dtype=np.float64)
        if self.position is not None:
            self._decide(float(np.linalg.norm(position - self.position)))
        self.position = position.copy()
        return self.state == 1

    def _decide(self, d: float) -> None:
        if self.decision == "avg":
            self.average = d if self.average is None else 0.5 * self.average + 0.5 * d
            state = 1 if d >= self.average else 0
        else:
            self.history.append(d)
            if len(self.history) < self.window:
                state = self.initial
            else:
                before = self.history[-self.window:-1]
                if d >= max(before):
                    state = 1
                elif d < min(before):
                    state = 0
                else:
                    state = self.state if self.last_state else 1
        if self.max_pruned:
            if state == 1 and self.streak >= self.max_pruned:
                state, self.streak = 0, 0
            else:
                self.streak = self.streak + 1 if state == 1 else 0
        self.state = state


class ADPPruner(Hooks):
    """The selection; which samples of a query prune is set in ``pruning`` before it (all when
    None, as with ``gate=static`` and in cost figures)."""

    def __init__(self, ratio: float = 0.75, split: Sequence[float] = (0.4, 0.6), images: int = 2,
                 text_margins: tuple[int, int] = (1, 57), keep: int = 0, positions: str = "renumber"):
        if keep < 0:
            raise ValueError(f"keep must be 0 (use ratio) or a token count, got {keep}")
        if not keep and not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be a fraction in (0, 1], got {ratio}")
        if any(w < 0 for w in split) or not sum(split) > 0:
            raise ValueError(f"split weights must be non-negative with a positive sum, got {list(split)}")
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
        self.ratio, self.keep, self.positions = ratio, keep, positions
        self.weights = image_weights(split, images) if images > 1 else [1.0]
        self.text_margins = text_margins
        self.pruning: list[bool] | None = None

    def plain_layer(self, layer: int) -> bool:
        return layer != 0

    def counts(self, visual: int) -> list[int]:
        """Visual tokens kept per camera image, out of ``visual`` over all images."""
        total = self.keep or max(1, int(round(visual * self.ratio)))
        if total > visual:
            raise ValueError(f"keep={total} exceeds the query's {visual} visual tokens")
        if total < len(self.weights):  # each image keeps at least one (the reference would loop forever)
            raise ValueError(f"keep={total} leaves fewer than one token per camera image ({len(self.weights)})")
        patches = visual // len(self.weights)
        if total == visual:  # the reference selects nothing at ratio 1
            return [patches] * len(self.weights)
        return [min(c, patches) for c in split_counts(total, self.weights)]

    def before_layer(self, layer: int, stream: TokenStream, queries_keys: QueriesKeys) -> TokenStream:
        if layer != 0:
            return stream
        b = stream.hidden.shape[0]
        pruning = [True] * b if self.pruning is None else list(self.pruning)
        if len(pruning) != b:
            raise ValueError(f"ADP was told which of {len(pruning)} samples prune, the query has {b}")
        visual, columns = visual_block(stream)
        v = visual.shape[1]
        per_image = self.counts(v)
        if not any(pruning) or sum(per_image) == v:
            return stream
        rows, row_weights = self._query_rows(stream)
        everyone = all(pruning)
        args = (rows, row_weights, visual)
        if not everyone:  # only the samples that prune are scored
            subset = torch.tensor([i for i in range(b) if pruning[i]], device=visual.device)
            args = tuple(a.index_select(0, subset) for a in args)

        def choice(rows, row_weights, visual):
            """(n, V) bool: the tokens each pruning sample keeps (fixed shapes: one graph on a GPU)."""
            return choose(importance(queries_keys, rows, row_weights, visual), per_image)

        if self.graphs is not None and not on_meta(visual):
            name = f"adp choice keep={','.join(map(str, per_image))}"
            picked = self.graphs.run(name, choice, *args)
        else:
            picked = choice(*args)
        if not everyone:  # the others keep every visual token
            picked = torch.ones(b, v, dtype=torch.bool, device=picked.device).index_copy(0, subset, picked)
        r, heads, head_dim = rows.shape[1], queries_keys.sizes.num_heads, queries_keys.sizes.head_dim
        cost = queries_keys.flops(r + v) + 2 * heads * r * v * head_dim  # q and k, then the scores
        self.add_cost([cost if p else 0 for p in pruning])
        # Each sample's count is known on the host: nothing is read back.
        dropped = [v - sum(per_image) if p else 0 for p in pruning]
        kept = keep_chosen(stream, columns, picked, dropped_sizes(stream.host_sizes(), dropped))
        return renumbered(kept) if self.positions == "renumber" else kept

    def _query_rows(self, stream: TokenStream) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, R, D) hidden states of each sample's BOS, prompt and stop token (shorter prompts
        padded with rows of weight 0) and (B, R) float weights 1/rows for the mean."""
        sizes = stream.host_sizes()
        text = text_counts(stream, self.text_margins)
        t, after, longest = stream.hidden.shape[1], self.text_margins[1], max(text)
        index = np.zeros((len(text), longest + 2), dtype=np.int64)
        weight = np.zeros(index.shape, dtype=np.float32)
        for i, (tokens, count) in enumerate(zip(sizes.tokens, text)):
            # Samples are left-padded: BOS is the first real token, the stop token the last.
            columns = [t - tokens, *range(t - after - count, t - after), t - 1]
            index[i, :len(columns)] = columns
            weight[i, :len(columns)] = 1.0 / len(columns)
        device = stream.hidden.device
        index_t = torch.from_numpy(index).to(device)
        rows = stream.hidden.gather(1, index_t[..., None].expand(-1, -1, stream.hidden.shape[2]))
        return rows, torch.from_numpy(weight).to(device)


def importance(queries_keys: QueriesKeys, rows: torch.Tensor, row_weights: torch.Tensor,
               visual: torch.Tensor) -> torch.Tensor:
    """(n, V) float32: each visual token's mean logit over the heads and the query rows, from
    layer 0's q of the rows and k of the visual tokens, without RoPE (position 0 rotates nothing)."""
    r = rows.shape[1]
    tokens = torch.cat([rows, visual], dim=1)
    q, k = queries_keys(tokens, torch.zeros(tokens.shape[:2], dtype=torch.long, device=tokens.device))
    q, k = q[:, :, :r].float(), per_query_head(k[:, :, r:], q.shape[1]).float()
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (n, H, R, V)
    return (logits.mean(dim=1) * row_weights[..., None]).sum(dim=1)


def choose(scores: torch.Tensor, per_image: Sequence[int]) -> torch.Tensor:
    """(n, V) bool: each image's ``per_image[i]`` highest-scoring tokens (one image: overall)."""
    n, v = scores.shape
    patches = v // len(per_image)
    if on_meta(scores):  # no values: the first tokens of each image stand in (the cost is the same)
        picks = [torch.arange(i * patches, i * patches + c).expand(n, c) for i, c in enumerate(per_image)]
        return torch.zeros(n, v, dtype=torch.bool).scatter(1, torch.cat(picks, dim=1), True)
    picks = [scores[:, i * patches:(i + 1) * patches].topk(c, dim=1).indices + i * patches
             for i, c in enumerate(per_image)]
    return torch.zeros(n, v, dtype=torch.bool, device=scores.device).scatter(1, torch.cat(picks, dim=1), True)
