"""DivPrune: keep the most diverse visual tokens, chosen greedily before LLM layer 0.

The reference (DivPrune, its LLaVA integration) takes the visual tokens entering the LLM
(the projector's outputs) and their pairwise cosine distances ``D = 1 - cos``, and solves a
max-min diversity problem greedily:

- the first token is the one farthest from its nearest neighbour (per column of D, its
  second-smallest entry: the smallest is its distance to itself);
- each next token is the one whose distance to the nearest token already chosen is largest
  (per column of D, the minimum over the chosen tokens' rows);
- ``round(ratio * V)`` tokens in all (the reference's default ratio 0.098), or ``keep``.

The chosen tokens stay in their original order. The reference renumbers the RoPE positions
of what is left (``positions=renumber``); ``positions=keep`` keeps the original ones, as
LightVLA does. Two differences from the reference code:
- Distances are computed in float32 (the reference: the model's half precision, where many
  near-equal distances tie).
- A chosen token is never chosen again. The reference's can be, when every token left is a
  duplicate of a chosen one, and then enters the LLM twice.

The method needs no task tokens and no attention: it is the training-free baseline that
looks at the image alone.
"""

from __future__ import annotations

import torch

from policies.pruning.base import POSITIONS, dropped_sizes, keep_chosen, on_meta, renumbered, visual_block
from policies.vla.hooks import Hooks, TokenStream


def cosine_distances(visual: torch.Tensor) -> torch.Tensor:
    """(B, V, D) tokens -> (B, V, V) float32 ``1 - cosine similarity`` of every pair."""
    unit = visual.float()
    unit = unit / unit.norm(dim=-1, keepdim=True)
    return 1.0 - unit @ unit.transpose(-2, -1)


def max_min_diverse(distance: torch.Tensor, count: int) -> torch.Tensor:
    """(B, V, V) distances -> (B, count) indices chosen greedily, in the order of choice.

    Keeps one running minimum per candidate instead of taking the minimum over all chosen rows
    again at every step: the same values, in count steps of O(V) each.
    """
    b, v, _ = distance.shape
    if not 1 <= count <= v:
        raise ValueError(f"DivPrune keeps 1..{v} of {v} visual tokens, got {count}")
    # A token's distance to itself is -inf: then the smallest of a column is always the token
    # itself, and a chosen token scores -inf from its own row on (the minimum keeps it there),
    # so a step takes three kernels (argmax, gather, minimum).
    distance = distance.clone()
    distance.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    # Farthest from its nearest neighbour: the second-smallest of a column.
    score = distance.topk(min(2, v), dim=1, largest=False).values[:, -1]
    chosen = []
    for step in range(count):
        pick = score.argmax(dim=1)  # the first of equal scores, as torch.argmax in the reference
        chosen.append(pick)
        row = distance.gather(1, pick[:, None, None].expand(b, 1, v))[:, 0]  # the new token's distances
        score = row if step == 0 else torch.minimum(score, row)
    return torch.stack(chosen, dim=1)


class DivPrunePruner(Hooks):
    def __init__(self, ratio: float = 0.098, keep: int = 0, positions: str = "renumber"):
        if keep < 0:
            raise ValueError(f"keep must be 0 (use ratio) or a token count, got {keep}")
        if not keep and not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be a fraction in (0, 1], got {ratio}")
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
        self.ratio, self.keep, self.positions = ratio, keep, positions

    def count(self, visual: int) -> int:
        """Visual tokens kept out of ``visual``: ``keep``, else ``round(ratio * visual)``, at least 1."""
        count = self.keep or max(1, round(self.ratio * visual))
        if count > visual:
            raise ValueError(f"keep={count} exceeds the query's {visual} visual tokens")
        return count

    def before_llm(self, stream: TokenStream) -> TokenStream:
        visual, columns = visual_block(stream)
        b, v, d = visual.shape
        count = self.count(v)
        self.add_cost([2 * v * v * d] * b)  # the pairwise similarities
        if self.graphs is not None and not on_meta(visual):  # fixed shapes: one graph for distances and choice
            chosen = self.graphs.run(f"divprune choice keep={count}", lambda x: self.chosen(x, count), visual)
        else:
            chosen = self.chosen(visual, count)
        # Every sample keeps ``count``: its counts are known, nothing is read on the host.
        kept = keep_chosen(stream, columns, chosen, dropped_sizes(stream.host_sizes(), [v - count] * b))
        return renumbered(kept) if self.positions == "renumber" else kept

    @staticmethod
    def chosen(visual: torch.Tensor, count: int) -> torch.Tensor:
        """(B, V) bool: the ``count`` visual tokens DivPrune keeps."""
        distance = cosine_distances(visual)
        if on_meta(distance):  # no values: the first tokens stand in (the cost is the same)
            picks = torch.arange(count).expand(visual.shape[0], count)
            return torch.zeros(visual.shape[:2], dtype=torch.bool).scatter(1, picks, True)
        picks = max_min_diverse(distance, count)
        return torch.zeros(visual.shape[:2], dtype=torch.bool, device=visual.device).scatter(1, picks, True)
