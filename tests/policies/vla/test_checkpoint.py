"""Checkpoint directories: round trip, the OpenVLA-OFT key conventions, and every loading error."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from policies.vla.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tests.tiny_vla import inputs, norm_stats, tiny_model


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    """A private copy that a test may damage."""
    return shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")


def shard_holding(directory, key):
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    return directory / weight_map[key]


def test_round_trip_gives_the_same_model(tiny_checkpoint):
    original = tiny_model()
    loaded = load_checkpoint(tiny_checkpoint).model
    assert original.state_dict().keys() == loaded.state_dict().keys()
    for key, value in original.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    pixels, proprio, prompts = inputs()
    with torch.no_grad():
        assert torch.equal(original(pixels, proprio, prompts, 2), loaded(pixels, proprio, prompts, 2))


def test_layout_is_openvla_oft(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "preprocessor_config.json", "dataset_statistics.json", "tokenizer.model",
            "model.safetensors.index.json", "action_head--1000_checkpoint.pt",
            "proprio_projector--1000_checkpoint.pt"} <= names
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    keys = set(json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())["weight_map"])
    assert "vision_backbone.featurizer.blocks.0.ls1.scale_factor" in keys  # LayerScale as transformers stores it
    assert not any(k.endswith(".gamma") for k in keys)
    assert "language_model.model.layers.1.self_attn.q_proj.weight" in keys
    assert "language_model.lm_head.weight" in keys and "projector.fc3.bias" in keys
    assert not any(k.startswith(("action_head.", "proprio_projector.")) for k in keys)
    head = torch.load(tiny_checkpoint / "action_head--1000_checkpoint.pt", weights_only=True)
    assert "model.mlp_resnet_blocks.1.ffn.1.weight" in head
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "openvla" and config["text_config"]["num_hidden_layers"] == 2


def test_ddp_module_prefix_and_bf16_weights_load(ckpt):
    for part in ("action_head", "proprio_projector"):
        path = next(ckpt.glob(f"{part}--*"))
        state = torch.load(path, weights_only=True)
        torch.save({f"module.{k}": v.to(torch.bfloat16) for k, v in state.items()}, path)
    model = load_checkpoint(ckpt, dtype=torch.float32).model
    assert model.action_head.model.fc1.weight.dtype == torch.float32


def test_a_config_with_only_the_text_config_differences_takes_llama_defaults(tmp_path):
    from policies.vla.config import config_from_json

    config = config_from_json({"model_type": "openvla", "use_fused_vision_backbone": True,
                               "vision_backbone_id": "dinosiglip-vit-so-224px",
                               "text_config": {"model_type": "llama", "vocab_size": 32064}})
    assert config.llm.num_layers == 32 and config.llm.hidden_size == 4096 and config.llm.vocab_size == 32064
    assert config.timm_model_ids[0].startswith("vit_large_patch14_reg4_dinov2")


def test_missing_tensor_is_named(ckpt):
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    path = shard_holding(ckpt, key)
    tensors = load_file(path)
    del tensors[key]
    save_file(tensors, path)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    del index["weight_map"][key]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"missing 1 tensors: '{key}'"):
        load_checkpoint(ckpt)


def test_unexpected_tensor_is_named(ckpt):
    path = shard_holding(ckpt, "projector.fc1.weight")
    tensors = load_file(path)
    tensors["projector.fc4.weight"] = torch.zeros(2, 2)
    save_file(tensors, path)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["projector.fc4.weight"] = path.name
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="unexpected 1 tensors: 'projector.fc4.weight'"):
        load_checkpoint(ckpt)


def test_wrong_shape_is_named(ckpt):
    path = next(ckpt.glob("proprio_projector--*"))
    state = torch.load(path, weights_only=True)
    state["fc1.weight"] = torch.zeros(64, 7)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"'proprio_projector.fc1.weight' is \(64, 7\), the model needs \(64, 8\)"):
        load_checkpoint(ckpt)


def test_index_naming_a_missing_shard(ckpt):
    shard = sorted(ckpt.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing weight file {shard.name}"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("name, message", [
    ("config.json", "missing config.json"),
    ("model.safetensors.index.json", "missing model.safetensors.index.json"),
    ("dataset_statistics.json", "missing dataset_statistics.json"),
])
def test_missing_files_are_named(ckpt, name, message):
    (ckpt / name).unlink()
    with pytest.raises((CheckpointError, ValueError), match=message):
        load_checkpoint(ckpt)


def test_missing_or_ambiguous_head_file(ckpt):
    head = next(ckpt.glob("action_head--*"))
    shutil.copy(head, ckpt / "action_head--2000_checkpoint.pt")
    with pytest.raises(CheckpointError, match="several action_head files"):
        load_checkpoint(ckpt)
    for path in ckpt.glob("action_head--*"):
        path.unlink()
    with pytest.raises(CheckpointError, match=r"missing action_head--\*_checkpoint.pt"):
        load_checkpoint(ckpt)


def test_head_files_load_weights_only(ckpt):
    """A .pt file holding a pickled object (not tensors) is refused rather than executed."""
    path = next(ckpt.glob("proprio_projector--*"))
    torch.save({"fc1.weight": torch.nn.Linear(8, 64)}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_checkpoint(ckpt)


def test_save_can_write_bf16(tmp_path):
    directory = save_checkpoint(tiny_model(), tmp_path / "bf16", norm_stats(), dtype=torch.bfloat16)
    tensors = load_file(next(directory.glob("model-*.safetensors")))
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert load_checkpoint(directory).model.projector.fc1.weight.dtype == torch.float32


def test_a_model_with_fused_projections_saves_and_loads(tmp_path):
    model = tiny_model()
    model.use_cuda_graphs()  # fuses the LLM's projections: their weights then share storage
    save_checkpoint(model, tmp_path / "fused", norm_stats())
    loaded = load_checkpoint(tmp_path / "fused").model
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_image_normalisation_is_what_the_released_processor_applies(ckpt):
    # The published preprocessor_config.json holds ImageNet's means/stds and, overriding them
    # when transformers loads the processor, those values rounded to bfloat16.
    pre_path = ckpt / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text())
    pre["means"] = [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]]
    pre["stds"] = [[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]]
    pre["tvf_normalize_params"] = [
        {"inplace": False, "mean": [0.484375, 0.455078125, 0.40625], "std": [0.228515625, 0.2236328125, 0.224609375]},
        {"inplace": False, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    ]
    pre_path.write_text(json.dumps(pre))
    config = load_checkpoint(ckpt).config
    assert config.image_means[0] == (0.484375, 0.455078125, 0.40625)
    assert config.image_stds[0] == (0.228515625, 0.2236328125, 0.224609375)
    del pre["tvf_normalize_params"]  # an older export: the means/stds are what it applies
    pre_path.write_text(json.dumps(pre))
    assert load_checkpoint(ckpt).config.image_means[0] == (0.485, 0.456, 0.406)
    pre_path.unlink()
    with pytest.raises(Exception, match="missing preprocessor_config.json"):
        load_checkpoint(ckpt)


def test_a_truncated_shard_is_an_error_that_names_it(ckpt):
    shard = shard_holding(ckpt, "projector.fc1.weight")
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{shard.name} cannot be read"):
        load_checkpoint(ckpt)


def test_damaged_small_files_are_errors_that_name_them(tiny_checkpoint, tmp_path):
    from policies.vla.config import ConfigError
    from policies.vla.tokenizer import SentencePieceTokenizer, TokenizerError

    for name, error in (("config.json", ConfigError), ("dataset_statistics.json", CheckpointError),
                        ("action_head--1000_checkpoint.pt", CheckpointError),
                        ("model.safetensors.index.json", CheckpointError)):
        ckpt = shutil.copytree(tiny_checkpoint, tmp_path / name)
        (ckpt / name).write_bytes((ckpt / name).read_bytes()[:40])
        with pytest.raises(error, match=name):
            load_checkpoint(ckpt)
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="tokenizer.model is not a SentencePiece model"):
        SentencePieceTokenizer(junk)


def test_identity_tells_apart_weights_of_equal_sizes(ckpt, monkeypatch):
    import policies.vla.checkpoint as checkpoint
    from policies.vla.checkpoint import checkpoint_identity

    monkeypatch.setattr(checkpoint, "SAMPLED_BYTES", 64)  # the shards sampled, as full-size ones are
    before = checkpoint_identity(ckpt)
    shard = shard_holding(ckpt, "projector.fc1.weight")
    tensors = load_file(shard)
    save_file({k: v + 1 for k, v in tensors.items()}, shard, metadata={"format": "pt"})
    after = checkpoint_identity(ckpt)
    assert after["files"] == before["files"] and after["digest"] != before["digest"]
