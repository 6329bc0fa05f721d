"""Low-rank adapters (LoRA) on the model's linear layers, as OpenVLA-OFT fine-tunes.

OpenVLA-OFT (and LightVLA after it) trains rank-32 adapters with alpha = min(rank, 16) on every
linear layer of the VLA (vision towers, projector, LLM; not the vocabulary projection), A drawn from N(0, 1/rank^2) and B zero,
so that an untrained adapter changes nothing. ``merged_state`` folds the adapters into the base
weights: the result is a plain model's state dict, which ``save_checkpoint`` writes in the
OpenVLA-OFT layout.
"""

from __future__ import annotations

import torch
from torch import nn

# The parts of OFTModel whose linear layers get adapters. The action head and the proprio
# projector are trained whole (OFT builds them new); the vocabulary embedding stays frozen.
ADAPTED_PARTS = ("vision_backbone", "projector", "language_model")
# peft's "all-linear" leaves out the output layer: the LLM's vocabulary projection (never
# computed here anyway).
SKIPPED = ("language_model.lm_head",)


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(x))``; the adapter's weights stay in float32 whatever the base's dtype."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.base = base
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        device = base.weight.device
        a = torch.randn(rank, base.in_features, generator=generator) / rank
        self.lora_a = nn.Parameter(a.to(device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device))

    @property
    def weight(self) -> torch.Tensor:  # readers of a layer's weight (shapes, dtype) see the base's
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (x.to(self.lora_a.dtype) @ self.lora_a.T) @ self.lora_b.T
        return self.base(x) + (update * self.scale).to(x.dtype)

    def merged_weight(self) -> torch.Tensor:
        delta = (self.lora_b @ self.lora_a) * self.scale
        return (self.base.weight.float() + delta).to(self.base.weight.dtype)


def add_lora(model: nn.Module, rank: int, alpha: float, seed: int = 0,
             parts: tuple[str, ...] = ADAPTED_PARTS) -> list[str]:
    """Freeze ``model`` and wrap every ``nn.Linear`` under ``parts`` in a ``LoRALinear``; returns
    the wrapped layers' names. The adapters' initial values depend on ``seed`` only."""
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    wrapped = []
    for part in parts:
        root = getattr(model, part)
        targets = [(name, module) for name, module in root.named_modules()
                   if isinstance(module, nn.Linear) and f"{part}.{name}" not in SKIPPED]
        for name, module in targets:
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            setattr(parent, child, LoRALinear(module, rank, alpha, generator))
            wrapped.append(f"{part}.{name}")
    if not wrapped:
        raise ValueError(f"no linear layers found under {', '.join(parts)}")
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the model without adapters, each adapter folded into its base weight."""
    layers = lora_layers(model)
    state = {}
    for key, tensor in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers:
            continue  # lora_a, lora_b: folded below
        if owner.endswith(".base") and owner[:-len(".base")] in layers:
            layer_name = owner[:-len(".base")]
            state[f"{layer_name}.{leaf}"] = layers[layer_name].merged_weight().detach() if leaf == "weight" else tensor
            continue
        state[key] = tensor
    return state


def merge_lora(model: nn.Module) -> None:
    """Replace every ``LoRALinear`` by its base layer with the adapter folded in (in place)."""
    for name, layer in lora_layers(model).items():
        with torch.no_grad():
            layer.base.weight.copy_(layer.merged_weight())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base)
