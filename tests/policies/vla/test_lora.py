"""LoRA adapters: an untrained adapter changes nothing, merging gives the adapted outputs, only adapters train."""

import pytest
import torch
from torch import nn

from policies.vla.lora import ADAPTED_PARTS, LoRALinear, add_lora, lora_layers, merge_lora, merged_state
from tests.tiny_vla import inputs, tiny_model


def adapted_outputs(model):
    pixels, proprio, prompts = inputs(batch=2, prompt_lengths=(9, 12))
    with torch.no_grad():
        return model(pixels, proprio, prompts, stop_id=2)


def randomise_adapters(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=gen) * 0.05)


def test_untrained_adapters_change_nothing():
    model = tiny_model()
    before = adapted_outputs(model)
    add_lora(model, rank=4, alpha=8)
    torch.testing.assert_close(adapted_outputs(model), before, rtol=0, atol=0)


def test_every_linear_layer_of_the_adapted_parts_is_wrapped_and_only_adapters_train():
    model = tiny_model()
    linears = [f"{part}.{name}" for part in ADAPTED_PARTS
               for name, m in getattr(model, part).named_modules() if isinstance(m, nn.Linear)]
    wrapped = add_lora(model, rank=4, alpha=8)
    assert wrapped == [name for name in linears if name != "language_model.lm_head"] and len(wrapped) > 20
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.lora_{ab}" for name in wrapped for ab in "ab"}
    # the heads were not wrapped (they are trained whole by the fine-tuning)
    assert not any(isinstance(m, LoRALinear) for m in model.action_head.modules())


def test_merged_weights_give_the_adapted_outputs():
    model = tiny_model()
    add_lora(model, rank=4, alpha=8)
    randomise_adapters(model)
    adapted = adapted_outputs(model)
    assert (adapted - adapted_outputs(tiny_model())).abs().max() > 1e-3  # the adapters act

    plain = tiny_model()
    plain.load_state_dict(merged_state(model))  # every key of the plain model, no adapter key
    torch.testing.assert_close(adapted_outputs(plain), adapted, rtol=1e-4, atol=1e-5)

    merge_lora(model)
    assert not lora_layers(model)
    torch.testing.assert_close(adapted_outputs(model), adapted, rtol=1e-4, atol=1e-5)


def test_adapter_initialisation_follows_the_seed_and_rank():
    a, b = tiny_model(), tiny_model()
    add_lora(a, rank=8, alpha=16, seed=3)
    add_lora(b, rank=8, alpha=16, seed=3)
    layer = lora_layers(a)["language_model.model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(layer.lora_a, lora_layers(b)["language_model.model.layers.0.self_attn.q_proj"].lora_a)
    assert layer.scale == 2.0 and torch.count_nonzero(layer.lora_b) == 0
    assert abs(float(layer.lora_a.detach().std()) - 1 / 8) < 0.02  # N(0, 1/rank^2), as OFT's "gaussian" init


def test_full_size_adapters_of_rank_32_have_the_parameters_the_layer_shapes_give():
    from policies.vla.config import full_config
    from policies.vla.model import OFTModel

    with torch.device("meta"):
        model = OFTModel(full_config())
    wrapped = add_lora(model, rank=32, alpha=16)
    per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules()
                   if n.endswith(".base") and isinstance(m, nn.Linear))
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    # DINOv2-L 24 x 4 layers, SigLIP 27 x 4 and its pooling head's 5, the projector's 3, Llama 32 x 7
    assert len(wrapped) == 96 + 113 + 3 + 224 and adapters == 32 * per_rank
    # written out: Llama 32 x (4 x 8192 + 2 x 15104 + 15104), DINOv2 24 x (4096 + 2048 + 2 x 5120),
    # SigLIP 27 x (4608 + 2304 + 2 x 5456) + 2304 + 3456 + 2304 + 2 x 5456, projector 10880 + 12800 + 8192
    assert adapters == 109_563_904


def test_adapters_stay_float32_on_a_bf16_model():
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = LoRALinear(base, rank=2, alpha=4)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert layer.lora_a.dtype == torch.float32 and layer(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="rank must be at least 1"):
        LoRALinear(base, rank=0, alpha=4)
