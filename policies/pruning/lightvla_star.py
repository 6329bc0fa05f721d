"""LightVLA*: LightVLA's selection with learnable queries instead of task-generated ones.

The public code for this variant is not released; choices made here (configuration):
``queries`` learnable vectors (default 128, initialised N(0, init_std^2) from a seed, by
default std 1 and seed 0; the scale does not change inference, which RMS-normalises them, but
sets their step size relative to the gradient in training). Placement ``llm:L``: after LLM decoder
layer L (``llm:0`` is between projector and layer 0; the paper reports L = 1-3), queries of
the LLM width score the visual tokens. Placement ``vision:B``: after block B of the vision
towers, queries of the DINOv2 width score each image's patches there, and both towers keep
the same patches from block B+1 on (so the towers' later blocks, the projector and the LLM
all see fewer tokens). Scores ``S = RMSNorm(Q) RMSNorm(P)^T / sqrt(D)``; inference keeps the
union of each query's argmax (per image in the vision placement) with original order and
RoPE positions. Training selects one token per query straight-through, so the visual block
becomes ``queries`` slots (per image in the vision placement) holding the selected tokens'
positions; in the vision placement tower 0's selection weights mix both towers' patches, so
the gradient reaches the queries and both towers. The queries are saved beside a
checkpoint as ``token_queries--{step}_checkpoint.pt``, with their placement; loading checks the
count and (where the file records it) the placement against the configuration.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from policies.pruning.base import keep_chosen, keep_tokens, rms_norm, visual_block
from policies.pruning.lightvla import (choose, distinct_selected, noise_scale, replace_visual, selected_positions,
                                      straight_through)
from policies.vla.hooks import Hooks, TokenStream, VisionSlots

QUERIES_FILE = "token_queries--{step}_checkpoint.pt"


def parse_placement(text: str, num_layers: int, vision_blocks: int) -> tuple[str, int]:
    """``llm:L`` (decoder layers run before the selection) or ``vision:B`` (after vision block B)."""
    kind, _, value = text.partition(":")
    limits = {"llm": num_layers, "vision": vision_blocks}
    if kind not in limits or not value.isdigit() or not 0 <= int(value) < limits[kind]:
        raise ValueError(f"placement must be llm:L with 0 <= L < {num_layers} or vision:B with "
                         f"0 <= B < {vision_blocks}, got {text!r}")
    return kind, int(value)


class LightVLAStarPruner(Hooks, nn.Module):
    def __init__(self, hidden_size: int, num_queries: int = 128, after_layer: int = 1, keep: int = 0, seed: int = 0,
                 vision_block: int | None = None, prefix_tokens: tuple[int, int] = (5, 0), init_std: float = 1.0):
        nn.Module.__init__(self)
        if not init_std > 0:
            raise ValueError(f"the queries' initial standard deviation must be positive, got {init_std}")
        gen = torch.Generator().manual_seed(seed)
        self.queries = nn.Parameter(torch.randn(num_queries, hidden_size, generator=gen) * init_std)
        self.after = after_layer if vision_block is None else None
        self.vision_block, self.prefix_tokens = vision_block, prefix_tokens
        # Chosen in tower 0, applied to tower 1: kept patches (inference) or slots (training).
        self._patch_keep: torch.Tensor | None = None
        self._slot_weights: torch.Tensor | None = None
        self._slot_patches: torch.Tensor | None = None
        self.keep = keep
        self.noise_scale = 0.0
        self.selected_tokens: torch.Tensor | None = None  # training: (B,) distinct tokens the last query selected
        self.eval()  # inference selection unless a trainer switches it to training

    @property
    def placement(self) -> str:
        return f"llm:{self.after}" if self.vision_block is None else f"vision:{self.vision_block}"

    def set_progress(self, step: int, max_steps: int) -> None:
        self.noise_scale = noise_scale(step, max_steps)

    def before_llm(self, stream: TokenStream) -> TokenStream:
        return self.select(stream) if self.after == 0 else stream

    def after_layer(self, layer, stream: TokenStream, q, k) -> TokenStream:
        return self.select(stream) if self.after is not None and layer == self.after - 1 else stream

    def plain_layer(self, layer: int) -> bool:
        return self.after is None or layer != self.after - 1

    def plain_vision(self) -> bool:
        return self.vision_block is None

    def plain_vision_block(self, tower: int, block: int) -> bool:
        return block != self.vision_block

    def on_vision_block(self, tower: int, block: int, tokens: torch.Tensor) -> torch.Tensor | VisionSlots | None:
        if block != self.vision_block:
            return None
        prefix = self.prefix_tokens[tower]
        if tower == 0:
            self._slot_weights = None
            if self.training:
                self._slot_weights, self._slot_patches = self._select_slots(tokens[:, prefix:])
            else:
                self._patch_keep = self._choose_patches(tokens[:, prefix:])
        if self.training:
            return self._fill_slots(tokens, prefix)
        if self._patch_keep is None:
            raise ValueError("the vision placement chooses patches in tower 0 before tower 1 runs")
        return self._patch_keep  # the same mask for both towers: its counts are read once

    def _images_per_sample(self, n: int) -> int:
        return n // len(self.cost()) if self.cost() else n  # start(batch) has run: its batch size

    def _select_slots(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: per image, straight-through weights (images, Q, P) and the selected patches (images, Q)."""
        n, q, p, d = patches.shape[0], self.queries.shape[0], patches.shape[1], patches.shape[-1]
        if q > p:
            raise ValueError(f"training needs at most {p} queries (the patches of an image), has {q}")
        images = self._images_per_sample(n)
        self.add_cost([2 * q * p * d * images] * (n // images))
        weights, indices = straight_through(self.scores(patches), self.noise_scale)
        self.selected_tokens = distinct_selected(indices, p).reshape(-1, images).sum(dim=1)
        return weights, indices

    def _fill_slots(self, tokens: torch.Tensor, prefix: int) -> VisionSlots:
        """This tower's patches mixed by tower 0's weights: both towers hold the same slots."""
        if self._slot_weights is None:
            raise ValueError("the vision placement selects slots in tower 0 before tower 1 runs")
        weights, patches = self._slot_weights, tokens[:, prefix:]
        n, q, p = weights.shape
        images = self._images_per_sample(n)
        self.add_cost([2 * q * p * patches.shape[-1] * images] * (n // images))
        slots = (weights.to(patches.dtype) @ patches).to(tokens.dtype)
        return VisionSlots(torch.cat([tokens[:, :prefix], slots], dim=1), self._slot_patches)

    def scores(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, Q, L) scores of tokens (N, L, D) by the learnable queries."""
        queries = rms_norm(self.queries.to(device=tokens.device, dtype=tokens.dtype))
        p = rms_norm(tokens)
        return queries @ p.transpose(-2, -1) / math.sqrt(p.shape[-1])

    def _choose_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(images, P) bool: per image, the union of the queries' argmax, or ``keep`` split over
        a sample's images (the first ``keep % images`` of them keep one more)."""
        n, q, d = patches.shape[0], self.queries.shape[0], patches.shape[-1]
        images = self._images_per_sample(n)
        self.add_cost([2 * q * patches.shape[1] * d * images] * (n // images))
        scores = self.scores(patches)  # rows: sample 0's images, then sample 1's, ...
        if not self.keep:
            return choose(scores, 0, "LightVLA*")
        if self.keep < images:
            raise ValueError(f"keep={self.keep} cannot be split over {images} images: each keeps at least one patch")
        shares = [self.keep // images + (image < self.keep % images) for image in range(images)]
        per_image = [choose(scores[image::images], share, "LightVLA*") for image, share in enumerate(shares)]
        return torch.stack(per_image, dim=1).reshape(n, -1)

    def select(self, stream: TokenStream) -> TokenStream:
        visual, columns = visual_block(stream)
        scores = self.scores(visual)  # (B, Q, V)
        b, v, d = visual.shape
        self.add_cost([2 * self.queries.shape[0] * v * d] * b)
        if self.training:
            if self.queries.shape[0] > v:
                raise ValueError(f"training needs at most {v} queries (the visual tokens), has {self.queries.shape[0]}")
            weights, indices = straight_through(scores, self.noise_scale)
            self.selected_tokens = distinct_selected(indices, v)
            self.add_cost([2 * self.queries.shape[0] * v * d] * b)
            n = self.queries.shape[0]
            stream = replace_visual(stream, columns[:, :n], weights @ visual, selected_positions(stream, columns, indices))
            keep = torch.ones_like(stream.visual)
            keep.scatter_(1, columns[:, n:], False)
            return keep_tokens(stream, keep)
        return keep_chosen(stream, columns, choose(scores, self.keep, "LightVLA*"))

    def save(self, directory: Path, step: int = 0) -> Path:
        path = Path(directory) / QUERIES_FILE.format(step=step)
        torch.save({"queries": self.queries.detach().cpu(), "placement": self.placement}, path)
        return path

    def load(self, directory: Path) -> Path:
        found = sorted(Path(directory).glob(QUERIES_FILE.format(step="*")))
        if len(found) != 1:
            raise FileNotFoundError(
                f"checkpoint {directory}: expected one {QUERIES_FILE.format(step='*')} with LightVLA*'s queries, "
                f"found {len(found)}"
            )
        state = torch.load(found[0], map_location="cpu", weights_only=True)
        queries = state.get("queries") if isinstance(state, dict) else None
        if queries is None or queries.ndim != 2 or queries.shape[1] != self.queries.shape[1]:
            shape = None if queries is None else tuple(queries.shape)
            raise ValueError(f"{found[0]}: 'queries' is {shape}, expected (N, {self.queries.shape[1]})")
        if queries.shape[0] != self.queries.shape[0]:
            raise ValueError(f"{found[0]} holds {queries.shape[0]} queries, configured {self.queries.shape[0]}: "
                             f"set queries={queries.shape[0]}")
        placement = state.get("placement")  # absent from files written before it was saved
        if placement is not None and placement != self.placement:
            raise ValueError(f"{found[0]} holds queries trained at placement {placement!r}, "
                             f"configured {self.placement!r}: set placement={placement}")
        self.queries = nn.Parameter(queries.clone())
        return found[0]
