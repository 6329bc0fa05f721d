"""SparseVLM: text-rated, progressive visual token pruning with recycling (training-free).

Pruning happens at a few stage layers (reference placement 2, 6, 15, 19 of a 32-layer LLM,
scaled to the model's depth). As in the reference code, stage layer l runs on the tokens it
is given, its own queries and keys rate the visual tokens, and its output is pruned: layer
l + 1 is the first to see fewer.

- Raters, chosen once per query before layer 0, as the reference does: the text tokens (the
  prompt; in OFT's layout the tokens after the visual block less the proprio token before
  the prompt and the 56 action slots and the stop token after it, ``text_margins``) that the
  visual tokens look at most. Each visual embedding's softmax over the text embeddings'
  dot products, averaged over the visual tokens, scores each text token; the raters are
  those scoring above the mean (always at least one). At each stage only the raters'
  attention rows are computed, so the layers themselves keep using fused SDPA.
- Importance of a visual token: the raters' attention to it, averaged over raters and heads.
- The budget is, as in the reference code, the mean number of visual tokens entering each LLM
  layer (``budget_of=mean``): its budget tables are sized by that sum (its comment counts the
  table of budget 192 as 2*576 + 4*300 + 10*200 + 16*110 = 32 * 191). ``budget_of=last`` makes
  the budget the count left after the last stage instead. The reference's sum counts each stage
  layer as already pruned while its code prunes the stage layer's output, so by the tokens its
  layers actually see its budgets 192, 128 and 64 give means of about 203, 141 and 79 on
  LLaVA's 576 (aggregated tokens not counted); ours is the mean of what the layers see.
- How many go: the paper removes N = lambda * (L_v - rank(M)), M the raters x visual
  attention matrix: the more linearly dependent the raters' views of the image, the more
  visual tokens are redundant. With R raters, rank(M) <= R, and R is far below L_v, so the
  raw L_v - rank(M) would remove most of the image at the first stage whatever it shows.
  We keep the direction and bound it. A stage seeing V visual tokens shares what is left of
  the budget geometrically over the stages left: with ``budget_of=mean``, the token-layers
  left for the layers after it, ``left = budget * layers - (tokens that entered layers 0 to
  this one)``, are ``sum_j n_j * V * r**j`` for the n_1, n_2, ... layers that see the count
  after each stage left; with ``budget_of=last``, ``r = (budget / V) ** (1 / stages left)``.
  The stage's geometric share is ``step = V - round(V * r)``. M's relative rank deficiency
  ``rho = 1 - rank(M) / min(R, V)`` (0: full rank, nearly 1: rank one) stretches it: the stage
  reduces the visual count by ``round(step * (1 + rho))``, i.e. between one and two geometric
  shares, but never below a floor: the budget (``last``), or the count that, kept through every
  later layer, spends what is left (``mean``: ``left / layers after it``, rounded up), nor above
  what leaves every later layer a token (``mean``). The last stage lands on the budget exactly
  (``last``), or on the count that spends what is left (``mean``: the mean is then within
  n_last / (2 * layers) tokens of the budget, 0.19 for 12 of 32 layers, unless the stages before
  are down to a token or two).
- Recycling: a stage removes the d least important visual tokens, of which the most
  important int(recycle * d) + 1 are recycled (the reference's top 30%, plus one), in
  int(recycled / cluster_size) + 1 clusters (the reference's tenth, plus one; at most the
  stage's target), found as the reference finds them (density peaks, ``density_peaks``):
  every recycled token joins the nearest centre, and each cluster's mean hidden state becomes
  a visual token. The aggregated tokens count as visual tokens: d is chosen so that d minus
  the clusters equals the reduction above, so every stage meets its target exactly.
- Positions, as the reference code (its default version, the one with recycling) has them
  (``positions=renumber``): after a stage the aggregated tokens follow the kept visual tokens,
  in cluster order, and every token is numbered again from 0 in sequence order (RoPE positions
  0..n-1), as its truncated ``position_ids`` do. ``positions=keep`` keeps each token's original
  RoPE position instead, as the reference's later version does (which does not recycle) and as
  LightVLA and FastV do; an aggregated token then takes its centre's slot.

On the meta device (cost counting) nothing has values: every importance is equal and M has
full rank, so the counts follow the geometric schedule, and no scoring runs. A mean budget
below what the layers up to the first stage already spend (each sees every visual token) is
refused when the plug-in is built. On real devices
the scoring's own matrix products (the rater choice's visual x text products, text rows over
all keys, the Gram product of the raters' attention to the visual tokens, the recycled
tokens' pairwise distances; about 0.01% of a full-size query) are reported as the plug-in's FLOPs,
which the query's total includes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

from policies.pruning.base import (POSITIONS, REFERENCE_DEPTH, dropped_sizes, keep_tokens, on_meta, parse_layers,
                                   renumbered, rows_attention, scale_layers, text_counts, text_rows)
from policies.vla.hooks import Hooks, TokenStream, right_aligned

def stage_layers(text: str, num_layers: int) -> list[int]:
    """Stage layers '2,6,15,19' of the 32-layer reference (each in 0..30) at the same relative
    depth of a ``num_layers`` LLM, clamped to 0..num_layers-2: pruning after the last layer
    would save nothing. Stages that land on one layer merge."""
    if num_layers < 2:
        raise ValueError(f"SparseVLM needs an LLM of at least 2 layers, got {num_layers}")
    layers = parse_layers(text, 0, REFERENCE_DEPTH - 2, "pruning after the last layer saves nothing")
    return scale_layers(layers, num_layers, 0, num_layers - 2)


def choose_raters(visual: torch.Tensor, visual_valid: torch.Tensor, text: torch.Tensor,
                  text_valid: torch.Tensor) -> torch.Tensor:
    """(B, M) bool: the raters among each sample's text tokens, from the embeddings.

    visual (B, V, D) and text (B, M, D) are the layer-0 input's visual and text tokens, the
    (B, V) and (B, M) masks mark each sample's own. Each visual token's softmax over the text
    tokens' dot products, averaged over the visual tokens, scores the text tokens; a rater
    scores above the mean of its sample's text tokens, or is the best of them.
    """
    logits = (visual.float() @ text.float().transpose(1, 2)).masked_fill(~text_valid[:, None, :], float("-inf"))
    weights = visual_valid.float()[:, :, None]
    score = (logits.softmax(dim=-1) * weights).sum(dim=1) / weights.sum(dim=1)  # (B, M), zero where not valid
    mean = score.sum(dim=1, keepdim=True) / text_valid.sum(dim=1, keepdim=True)
    best = score.masked_fill(~text_valid, -1.0).amax(dim=1, keepdim=True)
    return text_valid & ((score > mean) | (score == best))


def rate_visual(attention: torch.Tensor, raters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sample's visual importances (V,), the Gram matrix of its rater matrix and its number
    of raters, all on the device; ``attention`` (text tokens, V) is the text tokens' attention
    to the visual tokens, ``raters`` (text tokens,) bool the raters among them.

    Raters are averaged with a mask, not picked out, so that nothing is read on the host here:
    ``redundancies`` reads the Gram matrices and counts of a stage's samples in one copy.
    """
    rated = attention * raters[:, None]  # non-raters' rows zeroed: the raters' rank
    count = raters.sum()
    return rated.sum(dim=0) / count, gram_matrix(rated), count


def redundancies(grams: Sequence[torch.Tensor], counts: Sequence[torch.Tensor], visual: Sequence[int],
                 eps: float) -> list[float]:
    """Each sample's relative rank deficiency of its rater matrix (raters x ``visual[i]``), from
    its Gram matrix and rater count (``rate_visual``), read on the host in one copy."""
    host = torch.cat([g.flatten() for g in grams] + [torch.stack(list(counts)).double()]).cpu().numpy()
    raters, start, result = host[-len(counts):].astype(int), 0, []
    for gram, rows, columns in zip(grams, raters, visual):
        values = host[start:start + gram.numel()].reshape(gram.shape)
        start += gram.numel()
        shape = (int(rows), columns)
        result.append(1.0 - gram_rank(values, shape, eps) / min(shape))
    return result


def last_of(counts: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) bool: the last counts[b] places of row b (counts (B,) on the device)."""
    return torch.arange(width, device=counts.device)[None, :] >= (width - counts)[:, None]


def gram_matrix(matrix: torch.Tensor) -> torch.Tensor:
    """The smaller of M M^T and M^T M, in float64: the same nonzero eigenvalues, the squares of
    M's singular values."""
    m = matrix.double()
    return m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m


def gram_rank(gram: np.ndarray, shape: tuple[int, int], eps: float) -> int:
    """The rank ``torch.linalg.matrix_rank`` gives a float matrix of ``shape`` (singular values
    above max(rows, columns) * eps * the largest), from its Gram matrix on the host. In float64
    the squared singular values keep about 13 digits, far more than that threshold needs. An SVD
    of a 40 x 512 rater matrix took 2.2 ms on a CPU core, this 0.3 ms."""
    singular = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None))
    return int((singular > singular.max() * max(shape) * eps).sum())


def numerical_rank(matrix: torch.Tensor) -> int:
    """``torch.linalg.matrix_rank(matrix)`` by way of ``gram_rank``."""
    return gram_rank(gram_matrix(matrix).cpu().numpy(), tuple(matrix.shape), torch.finfo(matrix.dtype).eps)


def rank_flops(rows: int, columns: int) -> float:
    """The product of ``gram_matrix`` for a rows x columns matrix."""
    small, large = sorted((rows, columns))
    return 2.0 * small * small * large


BUDGET_OF = ("mean", "last")


def geometric_ratio(spans: Sequence[int], level: float) -> float:
    """r in [0, 1] with ``sum_j spans[j] * r ** (j + 1) == level`` (clamped to the ends); the sum
    grows with r, so bisection finds it."""
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if sum(n * middle ** (j + 1) for j, n in enumerate(spans)) < level:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def least_mean(layers: Sequence[int], num_layers: int, visual: int) -> float:
    """The least mean of visual tokens over the LLM layers that stages at ``layers`` can reach:
    the layers up to the first stage see all ``visual`` tokens, every later layer one."""
    full = min(layers) + 1
    return (full * visual + num_layers - full) / num_layers


def stage_target(visual: int, geometric: int, floor: int, redundancy: float) -> int:
    """Visual tokens left after a stage: the geometric share ``visual - geometric`` stretched by
    the redundancy, never below ``floor`` (the rule of the module docstring)."""
    return max(floor, visual - round((visual - geometric) * (1 + redundancy)))


def density_peaks(members: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the members (n, D) as the reference's DPC-KNN does: (clusters,) centre indices
    and (n,) the cluster of each member.

    Distances are Euclidean over sqrt(D); a member's density is exp(-mean squared distance to
    its ``clusters`` nearest members, itself included); its reach is its distance to the nearest
    denser member (the densest: the largest distance). The members of highest density x reach
    are the centres, in that order, and every member joins its nearest centre. Equal densities
    are ordered by index instead of the reference's random 1e-6, so the result is reproducible.
    """
    x = members.float()
    n, width = x.shape
    squares = (x * x).sum(dim=1)
    distance = (squares[:, None] + squares[None, :] - 2.0 * (x @ x.T)).clamp(min=0.0).sqrt() / math.sqrt(width)
    distance.fill_diagonal_(0.0)  # exactly, not up to the rounding of the expansion above
    density = (-(distance.topk(min(clusters, n), dim=1, largest=False).values ** 2).mean(dim=1)).exp()
    index = torch.arange(n, device=x.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (index[None, :] < index[:, None]))
    reach = torch.where(denser, distance, distance.max()).amin(dim=1)
    centres = (reach * density).topk(clusters).indices
    assign = distance[centres].argmin(dim=0)
    assign[centres] = torch.arange(clusters, device=x.device)
    return centres, assign


def cluster_means(members: torch.Tensor, assign: torch.Tensor, clusters: int) -> torch.Tensor:
    """(clusters, D) mean hidden state of each cluster, summed in fp32, in the members' dtype."""
    ones = torch.ones_like(assign, dtype=torch.float)
    sums = torch.zeros(clusters, members.shape[1], device=members.device).index_add(0, assign, members.float())
    sizes = torch.zeros(clusters, device=members.device).index_add(0, assign, ones)
    return (sums / sizes[:, None]).to(members.dtype)


def aggregates_last(shape: tuple[int, int], slots: list[torch.Tensor], last_visual: torch.Tensor) -> torch.Tensor:
    """(B, T) order of a stream's columns that moves each sample's aggregated tokens, in
    cluster order, to just after its visual block (``last_visual`` (B,): its last column);
    ``slots`` are (2, clusters) tensors of (sample, centre column), one per sample."""
    b, t = shape
    device = last_visual.device
    key = torch.arange(t, dtype=torch.float64, device=device).expand(b, t).clone()
    for rows_cols in slots:
        sample, centres = rows_cols.to(device)
        step = 1.0 / (centres.numel() + 1)
        key[sample, centres] = last_visual[sample].double() + step * torch.arange(1, centres.numel() + 1, device=device)
    return key.argsort(dim=1, stable=True)


def reordered(stream: TokenStream, order: torch.Tensor) -> TokenStream:
    """The stream's columns in ``order`` (B, T); the counts do not change."""
    device = stream.hidden.device
    on_device = order.to(device)
    hidden = stream.hidden.gather(1, on_device[..., None].expand(-1, -1, stream.hidden.shape[2]))
    padding = None if stream.padding is None else stream.padding.gather(1, order)
    return TokenStream(hidden, stream.position_ids.gather(1, order.to(stream.position_ids.device)),
                       stream.visual.gather(1, order), stream.task.gather(1, order), padding, stream.sizes)


class SparseVLMPruner(Hooks):
    def __init__(self, budget: int = 192, layers: Sequence[int] = (2, 6, 15, 19), recycle: float = 0.3,
                 cluster_size: int = 10, text_margins: tuple[int, int] = (0, 0), budget_of: str = "last",
                 num_layers: int | None = None, visual_tokens: int | None = None, positions: str = "keep"):
        """``budget_of="mean"`` needs the LLM's ``num_layers``; given the query's ``visual_tokens``,
        a mean budget out of reach is refused here rather than at the first query. The policy's
        defaults (``SparseVLMPolicy.Options``) are the reference's: a mean budget, renumbered positions."""
        if budget < 1:
            raise ValueError(f"budget must be at least 1 visual token, got {budget}")
        if not layers or min(layers) < 0:
            raise ValueError(f"layers must name at least one layer, each >= 0, got {list(layers)}")
        if not 0.0 <= recycle <= 1.0:
            raise ValueError(f"recycle must be a fraction in [0, 1], got {recycle}")
        if cluster_size < 1:
            raise ValueError(f"cluster_size must be at least 1, got {cluster_size}")
        if budget_of not in BUDGET_OF:
            raise ValueError(f"budget_of must be one of {', '.join(BUDGET_OF)}, got {budget_of!r}")
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
        self.budget, self.recycle, self.cluster_size, self.budget_of = budget, recycle, cluster_size, budget_of
        self.positions = positions
        self.layers = sorted(set(layers))
        self.text_margins = text_margins  # task tokens before and after the text (model.prompt_margins)
        self._raters = None  # (B, M) of the current query, chosen by before_llm
        if budget_of == "mean":
            if num_layers is None or self.layers[-1] > num_layers - 2:
                raise ValueError(f"a mean budget needs the LLM's depth and stage layers before its last layer, "
                                 f"got layers {self.layers} of {num_layers}")
            # layers that see the count left after each stage
            self.spans = [b - a for a, b in zip(self.layers, self.layers[1:] + [num_layers - 1])]
            self.num_layers = num_layers
            least = least_mean(self.layers, num_layers, visual_tokens) if visual_tokens else 0
            if budget < least:
                raise ValueError(
                    f"budget {budget} is out of reach as a mean over the {num_layers} LLM layers: layers "
                    f"0-{self.layers[0]} see all {visual_tokens} visual tokens, so the mean is at least {least:.1f}; "
                    f"raise the budget, prune from an earlier layer, or give budget_of=last")
        self._spent: list[int] = []  # per sample of the query: visual tokens that entered the layers accounted
        self._accounted = 0  # layers accounted (0 to the last stage layer seen, plus one)

    def start(self, batch: int) -> None:
        super().start(batch)
        self._spent, self._accounted = [0] * batch, 0

    def target(self, layer: int, sample: int, visual: int, redundancy: float) -> int:
        """The sample's visual tokens after stage ``layer``, from the ``visual`` tokens it sees and
        the redundancy of its rater matrix (the rule of the module docstring); ``visual`` when the
        stage keeps them all, whatever the redundancy is."""
        stage = self.layers.index(layer)
        if self.budget_of == "last":
            if visual <= self.budget:
                return visual
            geometric = round(visual * (self.budget / visual) ** (1 / (len(self.layers) - stage)))
            return stage_target(visual, geometric, self.budget, redundancy)
        spans = self.spans[stage:]
        left = self.budget * self.num_layers - self._spent[sample]  # token-layers for the layers after this one
        if len(spans) == 1:  # the count that comes closest to spending what is left
            return min(visual, max(1, round(left / spans[0])))
        geometric = round(visual * geometric_ratio(spans, left / visual))
        # At least what lets the later layers spend what is left (rounded up), at most what
        # leaves each of them a token.
        floor = min(visual, max(1, math.ceil(left / sum(spans))))
        ceiling = max(1, (left - sum(spans[1:])) // spans[0])
        return min(visual, ceiling, stage_target(visual, geometric, floor, redundancy))

    def account(self, layer: int, counts: Sequence[int]) -> None:
        """The visual tokens that entered layers up to ``layer`` (none pruned since the last stage)."""
        self._spent = [spent + visual * (layer + 1 - self._accounted) for spent, visual in zip(self._spent, counts)]
        self._accounted = layer + 1

    def wants_qk(self, layer: int) -> bool:
        return layer in self.layers

    def plain_layer(self, layer: int) -> bool:
        return layer not in self.layers

    def before_llm(self, stream: TokenStream) -> TokenStream:
        """Choose the query's raters from the layer-0 input (``choose_raters``)."""
        self._raters = None
        if on_meta(stream.hidden):
            return stream
        sizes, hidden, (before, after) = stream.host_sizes(), stream.hidden, self.text_margins
        texts = text_counts(stream, self.text_margins)
        t, m, longest = hidden.shape[1], max(texts), max(sizes.visual)
        text = hidden[:, t - after - m:t - after]  # left-padded: each sample's text ends here
        columns = right_aligned(stream.visual, longest)  # each sample's visual tokens at the end
        visual = hidden.gather(1, columns[:, :, None].expand(-1, -1, hidden.shape[2]))
        # The masks from the device's own masks: counts copied from the host would wait for the towers.
        own_visual = stream.visual.gather(1, columns)
        text_valid = last_of((stream.task & stream.real()).sum(dim=1) - before - after, m)
        self._raters = choose_raters(visual, own_visual, text, text_valid)
        self.add_cost([2.0 * v * c * hidden.shape[2] for v, c in zip(sizes.visual, texts)])
        return stream

    def removal_plan(self, visual: int, target: int) -> tuple[int, int, int]:
        """(removed, recycled, clusters) taking ``visual`` tokens to ``target``, aggregates included.

        removed - clusters grows by 0 or 1 with each further removal (from 0, and clusters
        never exceed the target), so the fewest removals that reach the reduction hit it exactly.
        """
        for removed in range(visual - target, visual + 1):
            # round: 0.29 * 100 is 28.999999999999996; recycle=0 turns recycling off
            recycled = min(removed, int(round(self.recycle * removed, 9)) + 1) if self.recycle else 0
            clusters = min(recycled // self.cluster_size + 1, target) if recycled else 0
            if removed - clusters == visual - target:
                return removed, recycled, clusters
        raise AssertionError("unreachable: removing every visual token leaves at most `target` clusters")

    def after_layer(self, layer, stream: TokenStream, q, k) -> TokenStream:
        if layer not in self.layers:
            return stream
        sizes = stream.host_sizes()
        counts, longest = sizes.visual, max(sizes.visual)
        self.account(layer, counts)
        visual_order = right_aligned(stream.visual, longest)  # each sample's visual columns, in order, at the end
        # Without redundancy a stage keeps the most: samples that would keep every token are not rated.
        columns = {b: visual_order[b, longest - visual:] for b, visual in enumerate(counts)
                   if self.target(layer, b, visual, 0.0) < visual}
        if not columns:
            return stream
        importance, redundancy = self.rate(stream, q, k, columns)
        keep = ~stream.visual
        for b in set(range(len(counts))) - set(columns):
            keep[b, visual_order[b, longest - counts[b]:]] = True
        slots, aggregates, dropped, cost = [], [], [0] * len(counts), [0.0] * len(counts)
        for b, sample_columns in columns.items():
            target = self.target(layer, b, counts[b], redundancy[b])
            dropped[b] = counts[b] - target
            kept, centres, merged = self.select(stream.hidden[b], sample_columns, importance[b], target, on_meta(q))
            _, recycled, clusters = self.removal_plan(counts[b], target)
            if clusters and not on_meta(q):
                cost[b] = 2.0 * recycled * recycled * stream.hidden.shape[2]  # the recycled tokens' distances
            keep[b, kept] = True
            if centres.numel():
                keep[b, centres] = True
                slots.append(torch.stack([torch.full_like(centres, b), centres]))
                aggregates.append(merged)
        self.add_cost(cost)
        hidden = stream.hidden
        if aggregates:  # out of place: the layer's output may be referenced elsewhere
            rows_cols = torch.cat(slots, dim=1).to(hidden.device)
            hidden = hidden.index_put((rows_cols[0], rows_cols[1]), torch.cat(aggregates))
        merged = TokenStream(hidden, stream.position_ids, stream.visual, stream.task, stream.padding, stream.sizes)
        kept_sizes = dropped_sizes(sizes, dropped)  # known here: keep_tokens reads nothing
        if self.positions == "keep":
            return keep_tokens(merged, keep, kept_sizes)
        if slots:
            order = aggregates_last(keep.shape, slots, visual_order[:, -1])
            merged, keep = reordered(merged, order), keep.gather(1, order)
        return renumbered(keep_tokens(merged, keep, kept_sizes))

    def rate(self, stream: TokenStream, q: torch.Tensor, k: torch.Tensor,
             columns: dict[int, torch.Tensor]) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
        """The visual importances and the redundancy of the rater matrix of each sample in
        ``columns`` (sample -> its visual columns), from the stage layer's text rows; one host
        read for all of them. Reports the products' FLOPs."""
        counts = stream.host_sizes().visual
        if on_meta(q):  # no values: equal importances, full rank
            return {b: torch.zeros(counts[b]) for b in columns}, dict.fromkeys(columns, 0.0)
        # sample b's text rows are the last text[b] of the m
        q_text, text = text_rows(q, stream, self.text_margins)
        m = q_text.shape[2]
        rows = rows_attention(q_text, k, stream.padding)  # (B, m, T)
        rated = {b: rate_visual(rows[b, m - text[b]:][:, c.to(rows.device)], self._raters[b, m - text[b]:])
                 for b, c in columns.items()}
        read = redundancies([r[1] for r in rated.values()], [r[2] for r in rated.values()],
                            [counts[b] for b in rated], torch.finfo(rows.dtype).eps)
        width = q.shape[1] * q.shape[3]
        cost = [2.0 * m * t * width for t in stream.host_sizes().tokens]  # the text rows
        for b in columns:
            cost[b] += rank_flops(text[b], counts[b])
        self.add_cost(cost)
        return {b: r[0] for b, r in rated.items()}, dict(zip(rated, read))

    def select(self, hidden: torch.Tensor, columns: torch.Tensor, importance: torch.Tensor, target: int,
               meta: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One sample's kept visual columns, centre columns, and the centres' aggregated states.

        hidden (T, D) is the sample's stream; columns (V,) its visual tokens, rated by importance.
        Once the target is known every shape is, so with graphs the choice and the clustering
        replay as one graph per (visual tokens, plan): about 60 operators a stage otherwise
        launched one by one.
        """
        plan = self.removal_plan(columns.numel(), target)
        if meta:  # no values to compare: any assignment costs the same
            return choose_and_recycle(*plan, hidden[columns.to(hidden.device)], columns, importance, meta=True)
        columns = columns.to(hidden.device)
        args = (hidden[columns], columns, importance)  # the gather outside: a key without the stream's length
        run = functools.partial(choose_and_recycle, *plan)
        if self.graphs is None:
            return run(*args)
        return self.graphs.run(f"sparsevlm choose and recycle {plan}", run, *args)


def choose_and_recycle(removed: int, recycled: int, clusters: int, visual_hidden: torch.Tensor, columns: torch.Tensor,
                       importance: torch.Tensor, meta: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``SparseVLMPruner.select`` for a removal plan: the kept columns (most important first),
    the recycled tokens' centre columns, and the centres' aggregated states (without clusters:
    the recycled columns and their states). visual_hidden (V, D) are the states of ``columns``
    (V,). A pure function of its tensors (graphable)."""
    visual = columns.numel()
    order = importance.argsort(descending=True, stable=True).to(columns.device)  # positions in columns
    kept = columns[order[: visual - removed]]
    recycled_order = order[visual - removed: visual - removed + recycled]
    members = visual_hidden[recycled_order.to(visual_hidden.device)]
    if not clusters:
        return kept, columns[recycled_order], members
    if meta:  # no values to compare: any assignment costs the same
        assign = torch.arange(recycled, device=members.device) % clusters
        return kept, columns[recycled_order[:clusters]], cluster_means(members, assign, clusters)
    centres, assign = density_peaks(members, clusters)
    return kept, columns[recycled_order[centres]], cluster_means(members, assign, clusters)
