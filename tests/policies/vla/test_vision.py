"""The fused backbone against timm's own intermediate-layer API on the same weights."""

import pytest
import torch

from policies.vla.config import tiny_config
from policies.vla.graphs import HostReads
from policies.vla.hooks import Hooks
from policies.vla.vision import VisionBackbone


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return VisionBackbone(tiny_config()).eval()


def test_each_tower_gives_timm_second_to_last_block_without_prefix_tokens(backbone):
    from policies.vla.hooks import Hooks

    pixels = torch.randn(3, 3, 224, 224)
    for index, tower in enumerate(backbone.towers):
        depth = len(tower.blocks)
        with torch.no_grad():
            (ref,) = tower.get_intermediate_layers(pixels, n={depth - 2})
            out = backbone.tower_features(index, pixels, Hooks())
        assert out.features.shape == (3, 256, tower.embed_dim) and out.patches is None
        assert torch.allclose(out.features, ref, atol=1e-6, rtol=0)
        assert out.counts == [[256 + tower.num_prefix_tokens] * 3] * (depth - 1)
    assert backbone.towers[0].num_prefix_tokens == 5  # DINOv2: class token + 4 registers


def test_two_images_fuse_to_512_tokens_in_camera_order(backbone):
    cam1, cam2 = torch.randn(2, 6, 224, 224), torch.randn(2, 6, 224, 224)
    with torch.no_grad():
        both = backbone(torch.cat([cam1, cam2], dim=1))
        from policies.vla.hooks import Hooks

        dino = backbone.tower_features(0, cam1[:, :3], Hooks()).features
        siglip = backbone.tower_features(1, cam1[:, 3:], Hooks()).features
    assert both.features.shape == (2, 512, backbone.embed_dim) and both.padding is None
    assert torch.equal(both.index[1], torch.arange(512))
    assert torch.allclose(both.features[:, :256], torch.cat([dino, siglip], dim=2), atol=1e-6)
    assert backbone.embed_dim == 32 + 48


def test_wrong_channel_count_is_an_error_naming_it(backbone):
    with pytest.raises(ValueError, match="6 channels; expected 12"):
        backbone(torch.randn(1, 6, 224, 224))


def test_full_size_towers_have_the_published_shapes():
    from policies.vla.config import full_config

    with torch.device("meta"):
        full = VisionBackbone(full_config())
    dino, siglip = full.towers
    assert (dino.embed_dim, len(dino.blocks), dino.num_prefix_tokens) == (1024, 24, 5)
    assert (siglip.embed_dim, len(siglip.blocks), siglip.num_prefix_tokens) == (1152, 27, 0)
    assert full.embed_dim == 2176 and full.patches_per_image == 256


def test_compiled_blocks_give_the_same_features_where_graphs_record_and_keep_the_checkpoint_keys(backbone):
    from policies.vla.graphs import recording
    from tests.tiny_vla import compiled_calls

    keys = list(backbone.state_dict())
    pixels = torch.randn(2, 12, 224, 224)
    with torch.inference_mode():
        eager = backbone(pixels).features
        backbone.compile_blocks()
        try:
            outside, calls_outside = compiled_calls(lambda: backbone(pixels).features)
            with recording():
                compiled, calls = compiled_calls(lambda: backbone(pixels).features)
                compiled_one = backbone(pixels[:1]).features  # another batch size
        finally:
            backbone.compile_blocks(False)
    assert list(backbone.state_dict()) == keys
    assert calls > 0 and calls_outside == 0 and torch.equal(outside, eager)
    assert torch.allclose(compiled, eager, atol=1e-5) and not torch.equal(compiled, torch.zeros_like(compiled))
    assert torch.allclose(compiled_one, eager[:1], atol=1e-5)
    assert backbone._block(0, 0) is backbone.towers[0].blocks[0]


def test_parallel_towers_on_the_cpu_run_one_after_the_other_and_give_the_same_features(backbone):
    pixels = torch.randn(1, 12, 224, 224)
    with torch.inference_mode():
        sequential = backbone(pixels).features
        backbone.parallel_towers = True
        try:
            parallel = backbone(pixels).features
        finally:
            backbone.parallel_towers = False
    assert torch.equal(parallel, sequential) and not backbone._side_streams


class KeepPatches(Hooks):
    """Keeps, after block 0 of each tower, the patches of that tower's mask."""

    def __init__(self, masks):
        self.masks = masks

    def plain_vision_block(self, tower, block):
        return block != 0

    def on_vision_block(self, tower, block, tokens):
        return self.masks[tower] if block == 0 else None


def patch_mask(images=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(images, 256, generator=generator) < 0.2


def test_a_mask_both_towers_share_is_read_once_and_keeps_the_same_as_two_equal_masks(backbone):
    pixels = torch.randn(1, 12, 224, 224)
    mask = patch_mask()
    with torch.no_grad():
        with HostReads() as shared_reads:
            shared = backbone(pixels, KeepPatches([mask, mask]))
        with HostReads() as equal_reads:
            equal = backbone(pixels, KeepPatches([mask, mask.clone()]))
    assert shared_reads.count == 1 and equal_reads.count == 3
    assert torch.equal(shared.features, equal.features) and torch.equal(shared.index, equal.index)
    # the kept patches in order, numbered over both images; the prefix tokens stayed in DINOv2
    assert shared.index[0].tolist() == mask.reshape(-1).nonzero().flatten().tolist()
    assert shared.features.shape == (1, int(mask.sum()), backbone.embed_dim)


def test_towers_keeping_different_patches_are_refused(backbone):
    with torch.no_grad(), pytest.raises(ValueError, match="same patches in both towers"):
        backbone(torch.randn(1, 12, 224, 224), KeepPatches([patch_mask(seed=0), patch_mask(seed=1)]))


def test_a_patch_mask_of_the_wrong_shape_is_refused_naming_the_shape(backbone):
    with_prefix = torch.ones(2, 261, dtype=torch.bool)  # DINOv2's 5 prefix tokens are not the hook's to keep
    with torch.no_grad(), pytest.raises(ValueError, match=r"\(2, 256\) bool mask .* got torch.bool \(2, 261\)"):
        backbone(torch.randn(1, 12, 224, 224), KeepPatches([with_prefix, with_prefix]))
