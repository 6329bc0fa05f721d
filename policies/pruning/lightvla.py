"""LightVLA: parameter-free, query-based visual token selection before LLM layer 0.

Scoring (reference ``TokenPruner``): with P the visual tokens and T the task tokens (everything
after the visual block), both RMS-normalised without a weight (fp32 inside, back to the
model's dtype), the queries ``Q = RMSNorm(softmax(P T^T / sqrt(D)) T)`` (one per visual
token) score every visual token: ``S = Q P^T / sqrt(D)``, a V x V matrix.

Inference keeps the union of each query's argmax, in order, with the original RoPE
positions. Training replaces the V visual slots by ``W @ P`` with the straight-through
``W = onehot(argmax S~) + softmax(S~) - stopgrad(softmax(S~))``, ``S~ = S + noise_scale * U[0,1)``,
and gives slot i the position of the token it selected; the length does not change.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from policies.pruning.base import (chosen_keep, kept_counts, kept_layout, on_meta, rms_norm, take_kept, task_block,
                                   task_tokens, visual_block, visual_count, visual_tokens)
from policies.vla.hooks import Hooks, TokenStream, sizes_on_host


def lightvla_scores(visual: torch.Tensor, task: torch.Tensor, task_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V, V) scores of visual tokens (B, V, D) by queries built from task tokens (B, n, D)."""
    p, t = rms_norm(visual), rms_norm(task)
    mask = None if task_mask is None else task_mask[:, None, :].to(t.device)
    queries = rms_norm(F.scaled_dot_product_attention(p, t, t, attn_mask=mask))
    return queries @ p.transpose(-2, -1) / math.sqrt(p.shape[-1])


def picked(indices: torch.Tensor, count: int) -> torch.Tensor:
    """(B, Q) token indices -> (B, count) bool: token j is named by some query."""
    keep = torch.zeros(indices.shape[0], count, dtype=torch.bool, device=indices.device)
    return keep.scatter(1, indices, True)


def union_of_argmax(scores: torch.Tensor) -> torch.Tensor:
    """(B, Q, V) scores -> (B, V) bool: token j is some query's argmax."""
    return picked(scores.argmax(dim=-1), scores.shape[-1])


def top_voted(scores: torch.Tensor, count: int) -> torch.Tensor:
    """(B, V) bool keeping exactly ``count`` tokens: most argmax votes first, then highest score.

    Random weights cannot show a learned keep count; cost figures force one this way.
    """
    votes = torch.zeros(scores.shape[0], scores.shape[-1], device=scores.device)
    votes = votes.scatter_add(1, scores.argmax(dim=-1), torch.ones(scores.shape[:2], device=scores.device))
    # |S| <= sqrt(D) (normalised vectors), so a vote always outweighs a score difference.
    rank = votes * 1e4 + scores.float().amax(dim=1)
    chosen = rank.topk(count, dim=1).indices
    return torch.zeros_like(votes, dtype=torch.bool).scatter(1, chosen, True)


def noise_scale(step: int, max_steps: int) -> float:
    """Training noise, annealed linearly from 1 at step 0 to 0 at ``max_steps``."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    return max(0.0, 1.0 - step / max_steps)


def straight_through(scores: torch.Tensor, noise_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(selection weights W (B, Q, V), selected indices (B, Q)) for training."""
    if noise_scale:
        scores = scores + torch.rand_like(scores) * noise_scale
    soft = scores.softmax(dim=-1)
    indices = scores.argmax(dim=-1)
    hard = F.one_hot(indices, scores.shape[-1]).to(soft.dtype)
    return hard + soft - soft.detach(), indices


def distinct_selected(indices: torch.Tensor, count: int) -> torch.Tensor:
    """(B,) how many distinct tokens of ``count`` the (B, Q) selected ``indices`` name: what
    inference would keep, were the scores the same (training reports it)."""
    return picked(indices, count).sum(dim=1)


def replace_visual(stream: TokenStream, columns: torch.Tensor, slots: torch.Tensor,
                   positions: torch.Tensor) -> TokenStream:
    """The stream with its visual block (at ``columns``) replaced by ``slots`` (same count)."""
    index = columns.to(stream.hidden.device)
    hidden = stream.hidden.scatter(1, index[..., None].expand(-1, -1, slots.shape[-1]), slots.to(stream.hidden.dtype))
    position_ids = stream.position_ids.scatter(1, columns.to(stream.position_ids.device),
                                              positions.to(stream.position_ids.device))
    return TokenStream(hidden, position_ids, stream.visual, stream.task, stream.padding, stream.sizes)


def selected_positions(stream: TokenStream, columns: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """RoPE positions of the visual tokens that ``indices`` (B, Q) pick among ``columns`` (B, V)."""
    positions = stream.position_ids.gather(1, columns.to(stream.position_ids.device))
    return positions.gather(1, indices.to(positions.device))


def random_ranks(candidates: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """(B, V) each candidate's place 0, 1, ... in a random order of its row's candidates (the
    others come after them all); row i draws from ``generators[i]``."""
    noise = torch.stack([torch.rand(candidates.shape[1], generator=g) for g in generators]).to(candidates.device)
    noise = noise.masked_fill(~candidates, 2.0)
    return noise.argsort(dim=1).argsort(dim=1)


def add_random(chosen: torch.Tensor, count: int, generators: list[torch.Generator]) -> torch.Tensor:
    """``chosen`` with ``count`` more tokens drawn uniformly from the unchosen (all, if fewer)."""
    return chosen | (random_ranks(~chosen, generators) < count) & ~chosen


def drop_random(chosen: torch.Tensor, fraction: float, generators: list[torch.Generator]) -> torch.Tensor:
    """``chosen`` less round(fraction x its count) of its tokens drawn uniformly (one is always kept)."""
    counts = chosen.sum(dim=1, keepdim=True)
    drop = torch.minimum(torch.round(counts * fraction), counts - 1)
    return chosen & ~(random_ranks(chosen, generators) < drop)


def choose(scores: torch.Tensor, keep: int, method: str) -> torch.Tensor:
    """(B, Q, V) scores -> (B, V) bool chosen tokens: the union of argmax, or ``keep`` forced.

    On the meta device there are no values, so a forced count takes the first tokens (which
    ones does not change the cost).
    """
    if on_meta(scores):
        if not keep:
            raise ValueError(f"on the meta device {method}'s selection has no values: force a count with keep=N")
        chosen = torch.zeros(scores.shape[0], scores.shape[-1], dtype=torch.bool)
        chosen[:, :keep] = True
        return chosen
    return top_voted(scores, keep) if keep else union_of_argmax(scores)


class LightVLAPruner(Hooks):
    def __init__(self, keep: int = 0, extra_random: int = 0, drop_kept: float = 0.0):
        if extra_random < 0 or not 0.0 <= drop_kept < 1.0:
            raise ValueError(f"extra_random must be >= 0 and drop_kept in [0, 1), got {extra_random} and {drop_kept}")
        if keep and (extra_random or drop_kept):
            raise ValueError("keep forces a count; the ablations extra_random and drop_kept change the learned one")
        self.keep = keep  # 0: the learned selection; N: force N tokens (cost figures)
        # The paper's ablations at inference: random tokens added to the selection, or a random
        # share of it dropped. Row i of a batch draws from ``generators[i]`` (the policy gives
        # each episode its own, so that draws do not depend on which episodes share a batch).
        self.extra_random, self.drop_kept = extra_random, drop_kept
        self.generators: list[torch.Generator] | None = None
        self.training = False
        self.noise_scale = 0.0
        self.selected_tokens: torch.Tensor | None = None  # training: (B,) distinct tokens the last query selected

    def set_progress(self, step: int, max_steps: int) -> None:
        self.noise_scale = noise_scale(step, max_steps)

    @property
    def ablated(self) -> bool:
        return bool(self.extra_random or self.drop_kept)

    def before_llm(self, stream: TokenStream) -> TokenStream:
        v, task_counts = visual_count(stream), list(stream.host_sizes().task)
        d = stream.hidden.shape[2]
        self.add_cost([2 * v * d * (2 * m + v) for m in task_counts])  # queries (two products) and the V x V scores
        if self.training:
            visual, columns = visual_block(stream)
            task, task_mask, _ = task_block(stream)
            weights, indices = straight_through(lightvla_scores(visual, task, task_mask), self.noise_scale)
            self.selected_tokens = distinct_selected(indices, v)
            self.add_cost([2 * v * v * d] * len(task_counts))  # W @ P
            return replace_visual(stream, columns, weights @ visual, selected_positions(stream, columns, indices))
        # Everything up to the kept counts has fixed shapes: one graph (a GPU then idles only
        # while the counts are read and the gathers after them are launched).
        n, masked = max(task_counts), min(task_counts) != max(task_counts)
        layout = functools.partial(self.layout, visual_count=v, task_count=n, masked=masked)
        args = (stream.hidden, stream.visual, stream.task, stream.padding)
        if self.graphs is not None and not on_meta(stream.hidden) and not self.ablated:  # ablations draw on the host
            order, masks, counts = self.graphs.run(f"lightvla keep={self.keep} visual={v} task={n} masked={masked}",
                                                   layout, *args)
        else:
            order, masks, counts = layout(*args)
        return take_kept(stream, order, masks, sizes_on_host(counts))

    def layout(self, hidden: torch.Tensor, is_visual: torch.Tensor, is_task: torch.Tensor,
               padding: torch.Tensor | None, visual_count: int, task_count: int,
               masked: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``kept_layout`` and ``kept_counts`` of the tokens inference keeps, from the stream's
        tensors and its host counts (the last ``task_count`` tokens hold every sample's task
        tokens; ``masked`` when some samples have fewer)."""
        visual, columns = visual_tokens(hidden, is_visual, visual_count)
        chosen = self.chosen(visual, *task_tokens(hidden, is_task, task_count, masked))
        order, masks = kept_layout(chosen_keep(is_visual, columns, chosen), is_visual, is_task, padding)
        return order, masks, kept_counts(masks)

    def chosen(self, visual: torch.Tensor, task: torch.Tensor, task_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, V) bool: the visual tokens inference keeps."""
        chosen = choose(lightvla_scores(visual, task, task_mask), self.keep, "LightVLA")
        if not self.ablated:
            return chosen
        generators = self.generators or [torch.Generator().manual_seed(0)] * chosen.shape[0]
        if len(generators) != chosen.shape[0]:
            raise ValueError(f"{len(generators)} random generators for a batch of {chosen.shape[0]}")
        if self.extra_random:
            chosen = add_random(chosen, self.extra_random, generators)
        if self.drop_kept:
            chosen = drop_random(chosen, self.drop_kept, generators)
        return chosen
