"""The small networks around the LLM: vision projector, proprio projector, L1 action head.

Parameter names are those of OpenVLA-OFT's checkpoints (``projector.fc1`` ...,
``action_head`` files with ``model.fc1`` ..., ``proprio_projector`` files with ``fc1``, ``fc2``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FusedProjector(nn.Module):
    """2176 -> 4 * 2176 -> GELU -> 4096 -> GELU -> 4096 (OpenVLA's fused-gelu-mlp)."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


class ProprioProjector(nn.Module):
    def __init__(self, proprio_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, proprio: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(proprio)))


class ResidualBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    def __init__(self, blocks: int, input_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.mlp_resnet_blocks = nn.ModuleList(ResidualBlock(hidden_dim) for _ in range(blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class L1ActionHead(nn.Module):
    """Hidden states of the 56 action slots (B, 56, D) -> 8 normalised 7-D actions (B, 8, 7).

    The 7 slots of one action are concatenated (7 * D features) and mapped by one MLPResNet.
    """

    def __init__(self, llm_dim: int, action_dim: int, chunk_length: int, blocks: int = 2):
        super().__init__()
        self.action_dim, self.chunk_length = action_dim, chunk_length
        self.model = MLPResNet(blocks, llm_dim * action_dim, llm_dim, action_dim)

    def forward(self, action_hidden: torch.Tensor) -> torch.Tensor:
        b = action_hidden.shape[0]
        return self.model(action_hidden.reshape(b, self.chunk_length, -1))
