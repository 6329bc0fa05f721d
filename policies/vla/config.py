"""Model configuration: OpenVLA-OFT's sizes, read from a checkpoint or a named preset.

A checkpoint's ``config.json`` is the OpenVLA layout (``timm_model_ids``, ``image_sizes``,
``text_config`` ...). Its ``text_config`` often lists only what differs from transformers'
``LlamaConfig`` defaults, which are Llama-2-7B's sizes, so missing fields take those values.
``timm_model_overrides`` is ours: keyword arguments for ``timm.create_model`` that shrink
the towers of the ``tiny`` preset; real checkpoints do not have it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DINOV2_ID = "vit_large_patch14_reg4_dinov2.lvd142m"
SIGLIP_ID = "vit_so400m_patch14_siglip_224"
# DINOv2's input normalisation as the released OpenVLA processors apply it: ImageNet's
# (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) rounded to bfloat16 when the processor was
# exported. Their preprocessor_config.json stores these as tvf_normalize_params, which
# override its means/stds when transformers loads the processor, for fine-tuning and
# evaluation alike; so the checkpoints expect them.
DINOV2_MEAN, DINOV2_STD = (0.484375, 0.455078125, 0.40625), (0.228515625, 0.2236328125, 0.224609375)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

# transformers' LlamaConfig defaults (= Llama-2-7B), used where text_config is silent.
LLAMA_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,  # None means: as many as attention heads
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
}

# OpenVLA's vision_backbone_id -> timm ids, for configs that do not list timm_model_ids.
VISION_BACKBONES = {"dinosiglip-vit-so-224px": ([DINOV2_ID, SIGLIP_ID], [224, 224])}


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class LlamaSizes:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class VLAConfig:
    timm_model_ids: tuple[str, ...]
    image_sizes: tuple[int, ...]
    llm: LlamaSizes
    timm_model_overrides: tuple[dict, ...] = ({}, {})
    image_means: tuple[tuple[float, float, float], ...] = (DINOV2_MEAN, SIGLIP_MEAN)
    image_stds: tuple[tuple[float, float, float], ...] = (DINOV2_STD, SIGLIP_STD)
    num_images: int = 2  # third-person camera, then wrist camera
    proprio_dim: int = 8
    action_dim: int = 7
    chunk_length: int = 8
    head_blocks: int = 2
    pad_to_multiple_of: int = 64
    extra: dict = field(default_factory=dict, compare=False)  # config.json fields we keep but do not use

    def __post_init__(self):
        if len(self.timm_model_ids) != 2:
            raise ConfigError(
                f"expected the fused backbone's two timm models, got timm_model_ids={list(self.timm_model_ids)}"
            )
        if self.llm.hidden_size % self.llm.num_heads or self.llm.num_heads % self.llm.num_kv_heads:
            raise ConfigError(
                f"hidden_size {self.llm.hidden_size}, {self.llm.num_heads} heads and "
                f"{self.llm.num_kv_heads} key/value heads do not divide evenly"
            )

    @property
    def action_tokens(self) -> int:
        return self.chunk_length * self.action_dim

    def to_json_dict(self) -> dict[str, Any]:
        """config.json in OpenVLA's layout (plus our overrides when present)."""
        text = {
            "model_type": "llama",
            "vocab_size": self.llm.vocab_size,
            "hidden_size": self.llm.hidden_size,
            "intermediate_size": self.llm.intermediate_size,
            "num_hidden_layers": self.llm.num_layers,
            "num_attention_heads": self.llm.num_heads,
            "num_key_value_heads": self.llm.num_kv_heads,
            "rms_norm_eps": self.llm.rms_norm_eps,
            "rope_theta": self.llm.rope_theta,
        }
        out = dict(self.extra)
        out.update({
            "model_type": "openvla",
            "use_fused_vision_backbone": True,
            "timm_model_ids": list(self.timm_model_ids),
            "image_sizes": list(self.image_sizes),
            "pad_to_multiple_of": self.pad_to_multiple_of,
            "text_config": text,
        })
        if any(self.timm_model_overrides):
            out["timm_model_overrides"] = [dict(o) for o in self.timm_model_overrides]
        return out

    def preprocessor_json_dict(self) -> dict[str, Any]:
        return {
            "image_processor_type": "PrismaticImageProcessor",
            "use_fused_vision_backbone": True,
            "image_resize_strategy": "resize-naive",
            "input_sizes": [[3, s, s] for s in self.image_sizes],
            "interpolations": ["bicubic", "bicubic"],
            "means": [list(m) for m in self.image_means],
            "stds": [list(s) for s in self.image_stds],
            "tvf_normalize_params": [{"mean": list(m), "std": list(s), "inplace": False}
                                     for m, s in zip(self.image_means, self.image_stds)],
        }


def llama_sizes(text_config: dict[str, Any]) -> LlamaSizes:
    merged = {**LLAMA_DEFAULTS, **{k: v for k, v in text_config.items() if k in LLAMA_DEFAULTS}}
    heads = int(merged["num_attention_heads"])
    return LlamaSizes(
        vocab_size=int(merged["vocab_size"]),
        hidden_size=int(merged["hidden_size"]),
        intermediate_size=int(merged["intermediate_size"]),
        num_layers=int(merged["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(merged["num_key_value_heads"] or heads),
        rms_norm_eps=float(merged["rms_norm_eps"]),
        rope_theta=float(merged["rope_theta"]),
    )


def config_from_json(config: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> VLAConfig:
    """Build the config from a checkpoint's config.json (and preprocessor_config.json)."""
    if config.get("model_type") not in ("openvla", None):
        raise ConfigError(f"config.json has model_type {config.get('model_type')!r}, expected 'openvla'")
    if config.get("use_fused_vision_backbone") is False:
        raise ConfigError("config.json: use_fused_vision_backbone is false; only the fused DINOv2+SigLIP backbone is supported")
    ids, sizes = config.get("timm_model_ids"), config.get("image_sizes")
    if ids is None:
        backbone = config.get("vision_backbone_id")
        if backbone not in VISION_BACKBONES:
            raise ConfigError(f"config.json names neither timm_model_ids nor a known vision_backbone_id ({backbone!r})")
        ids, default_sizes = VISION_BACKBONES[backbone]
        sizes = sizes or default_sizes
    overrides = config.get("timm_model_overrides") or [{} for _ in ids]
    kwargs: dict[str, Any] = {}
    if preprocessor is not None:
        if preprocessor.get("image_resize_strategy", "resize-naive") != "resize-naive":
            raise ConfigError(
                f"preprocessor_config.json: image_resize_strategy {preprocessor['image_resize_strategy']!r} "
                "is not supported (OpenVLA-OFT's LIBERO checkpoints use 'resize-naive')"
            )
        kwargs["image_means"], kwargs["image_stds"] = normalisation(preprocessor)
    known = {"model_type", "use_fused_vision_backbone", "timm_model_ids", "image_sizes", "text_config",
             "timm_model_overrides", "pad_to_multiple_of"}
    return VLAConfig(
        timm_model_ids=tuple(ids),
        image_sizes=tuple(int(s) for s in sizes),
        llm=llama_sizes(config.get("text_config") or {}),
        timm_model_overrides=tuple(dict(o) for o in overrides),
        pad_to_multiple_of=int(config.get("pad_to_multiple_of", 64)),
        extra={k: v for k, v in config.items() if k not in known},
        **kwargs,
    )


def normalisation(preprocessor: dict[str, Any]) -> tuple[tuple, tuple]:
    """Each tower's (means, stds) as the released processor applies them: its
    ``tvf_normalize_params`` where present (they override ``means``/``stds``), else those."""
    params = preprocessor.get("tvf_normalize_params")
    try:
        if params:
            pairs = [(p["mean"], p["std"]) for p in params]
        else:
            pairs = list(zip(preprocessor["means"], preprocessor["stds"]))
        means, stds = (tuple(tuple(float(v) for v in pair[i]) for pair in pairs) for i in (0, 1))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"preprocessor_config.json: no usable image means and stds ({type(exc).__name__}: {exc})") from None
    if any(len(m) != 3 for m in means + stds) or any(v <= 0 for s in stds for v in s):
        raise ConfigError(f"preprocessor_config.json: image means {means} / stds {stds} are not 3 values per tower, stds > 0")
    return means, stds


def read_json(path: Path, error=ValueError) -> Any:
    """A JSON file of a checkpoint; a damaged one is an ``error`` naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON: {exc}") from None


def read_config(checkpoint_dir: Path) -> VLAConfig:
    checkpoint_dir = Path(checkpoint_dir)
    path, pre_path = checkpoint_dir / "config.json", checkpoint_dir / "preprocessor_config.json"
    for needed in (path, pre_path):  # the image normalisation is read from the checkpoint, never assumed
        if not needed.is_file():
            raise ConfigError(f"checkpoint {checkpoint_dir}: missing {needed.name}")
    return config_from_json(read_json(path, ConfigError), read_json(pre_path, ConfigError))


def full_config() -> VLAConfig:
    """OpenVLA-OFT for LIBERO: DINOv2-L + SigLIP-SO400M at 224, Llama-2-7B (vocab 32000 padded to 32064)."""
    return VLAConfig(
        timm_model_ids=(DINOV2_ID, SIGLIP_ID),
        image_sizes=(224, 224),
        llm=llama_sizes({"vocab_size": 32064}),
    )


def tiny_config() -> VLAConfig:
    """The same architecture at toy sizes, for CPU tests and demos (still 2 x 256 visual tokens)."""
    return VLAConfig(
        timm_model_ids=(DINOV2_ID, SIGLIP_ID),
        image_sizes=(224, 224),
        llm=llama_sizes({
            "vocab_size": 320, "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2,
        }),
        timm_model_overrides=(
            {"embed_dim": 32, "depth": 3, "num_heads": 2},
            {"embed_dim": 48, "depth": 3, "num_heads": 2},
        ),
    )


PRESETS = {"full": full_config, "tiny": tiny_config}


def preset(name: str) -> VLAConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model size {name!r}; valid sizes: {', '.join(PRESETS)}")
    return PRESETS[name]()


def replace_llm(config: VLAConfig, **changes) -> VLAConfig:
    return dataclasses.replace(config, llm=dataclasses.replace(config.llm, **changes))
