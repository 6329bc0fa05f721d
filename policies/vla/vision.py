"""The fused vision backbone: DINOv2 and SigLIP ViTs from timm, features of the second-to-last block.

The towers are created without pretrained weights (weights come from the checkpoint). Each
keeps all its timm parameters (last block, final norm, SigLIP's pooling head) so checkpoint
keys match one to one, but only the blocks up to the second-to-last are run, with no final
norm, and the prefix tokens (class token, registers) are dropped: OpenVLA's
``get_intermediate_layers(n={depth - 2})``.
"""

from __future__ import annotations

import torch
from torch import nn

from policies.vla.config import VLAConfig
from policies.vla.hooks import Hooks, QueryTrace


def create_tower(model_id: str, image_size: int, overrides: dict) -> nn.Module:
    import timm

    return timm.create_model(model_id, pretrained=False, num_classes=0, img_size=image_size, **overrides)


class VisionBackbone(nn.Module):
    def __init__(self, config: VLAConfig):
        super().__init__()
        self.featurizer = create_tower(config.timm_model_ids[0], config.image_sizes[0], config.timm_model_overrides[0])
        self.fused_featurizer = create_tower(config.timm_model_ids[1], config.image_sizes[1], config.timm_model_overrides[1])
        self.num_images = config.num_images
        self.embed_dim = self.featurizer.embed_dim + self.fused_featurizer.embed_dim

    @property
    def towers(self) -> tuple[nn.Module, nn.Module]:
        return self.featurizer, self.fused_featurizer

    @property
    def patches_per_image(self) -> int:
        return self.featurizer.patch_embed.num_patches

    def tower_features(self, index: int, pixels: torch.Tensor, hooks: Hooks) -> tuple[torch.Tensor, list[int]]:
        """Patch features (N, P, C) of one tower, and the tokens that entered each block it ran."""
        tower = self.towers[index]
        x = tower.patch_embed(pixels)
        x = tower._pos_embed(x)
        x = tower.patch_drop(x)
        x = tower.norm_pre(x)
        counts = []
        for block_index in range(len(tower.blocks) - 1):  # through the second-to-last block
            counts.append(x.shape[1])
            x = tower.blocks[block_index](x)
            x = hooks.on_vision_block(index, block_index, x)
        return x[:, tower.num_prefix_tokens:], counts

    def forward(self, pixel_values: torch.Tensor, hooks: Hooks | None = None,
                traces: list[QueryTrace] | None = None) -> torch.Tensor:
        """pixel_values (B, 6 * images, H, W) -> (B, images * patches, 2176) visual tokens.

        Channels per image: 3 normalised for DINOv2, then 3 for SigLIP; images third-person first.
        """
        hooks = hooks or Hooks()
        b, channels = pixel_values.shape[:2]
        if channels != 6 * self.num_images:
            raise ValueError(
                f"pixel_values has {channels} channels; expected {6 * self.num_images} "
                f"(6 per image for {self.num_images} images)"
            )
        # All images of the batch go through each tower in one call: (B*images, 3, H, W).
        per_image = pixel_values.reshape(b * self.num_images, 6, *pixel_values.shape[2:])
        feats = []
        for index in range(2):
            f, counts = self.tower_features(index, per_image[:, 3 * index:3 * index + 3], hooks)
            feats.append(f)
            if traces is not None:
                for trace in traces:
                    trace.vision_tokens.append([c * self.num_images for c in counts])
        fused = torch.cat(feats, dim=2)  # (B*images, P, 2176)
        return fused.reshape(b, self.num_images * fused.shape[1], fused.shape[2])
