"""Typed configuration: the single source of defaults.

Every shape the model uses (tile size, token grid, SAM input size, prompt width) is read from
:class:`ModelConfig`, so a tiny preset can run on small images on a CPU while the published presets
carry the real Sa2VA shapes.  Configs round-trip through plain dicts / YAML; unknown keys are an
error that names the key and the section it was found in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot be used, with a message saying what to change."""


@dataclass
class VisionConfig:
    """InternViT tower (frozen)."""

    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    downsample_ratio: float = 0.5  # pixel shuffle
    qkv_bias: bool = True
    qk_norm: bool = False
    norm_type: str = "layer_norm"  # "rms_norm" for InternViT-6B
    layer_scale_init: float = 0.1
    layer_norm_eps: float = 1e-6


@dataclass
class LLMConfig:
    """Qwen2-style decoder (frozen base + LoRA)."""

    vocab_size: int = 151_674
    hidden_size: int = 2048
    num_layers: int = 36
    num_heads: int = 16
    num_kv_heads: int = 2
    intermediate_size: int = 11008
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False


@dataclass
class SAM2Config:
    """SAM2 grounding encoder (Hiera image encoder frozen, mask decoder trained)."""

    image_size: int = 1024
    hiera_embed_dim: int = 144  # Hiera-L
    hiera_num_heads: int = 2
    hiera_stages: tuple[int, ...] = (2, 6, 36, 4)
    hiera_global_attention_blocks: tuple[int, ...] = (23, 33, 43)
    hiera_window_sizes: tuple[int, ...] = (8, 4, 16, 8)
    hiera_window_pos_bkg: tuple[int, int] = (7, 7)
    prompt_dim: int = 256  # fpn hidden size == decoder width == sparse prompt width
    decoder_layers: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    # the two-way transformer's cross-attention width is prompt_dim / this (SAM2: 2).  Narrow decoders
    # trained from scratch (the demo preset) learn to pick the prompted object far sooner at 1.
    attention_downsample_rate: int = 2
    pad_point_tokens: bool = True  # Sa2VA prepends the "no point" sparse tokens to the language token
    # SAM2's eval-time fallback from the single-mask token to the best multimask token when the single
    # mask looks unstable.  On for published (SAM2-pretrained) decoders, as in SAM2 and Sa2VA; off for
    # models trained from scratch, whose multimask tokens are never trained.
    dynamic_multimask: bool = True


@dataclass
class LoRAConfig:
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


SEG_ANSWER_STYLES = ("fixed", "phrase")  # ModelConfig.seg_answer (maskloop.model.prompts)


@dataclass
class ModelConfig:
    name: str = "sa2va-4b"
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    sam2: SAM2Config = field(default_factory=SAM2Config)
    lora: LoRAConfig | None = field(default_factory=LoRAConfig)
    template: str = "phi3"
    # referring answer: "fixed" = "Sure, [SEG]." (Sa2VA); "phrase" = "Sure, <p>{expr}</p> [SEG]." (model/prompts.py)
    seg_answer: str = "fixed"
    # InternVL dynamic tiling (maskloop.data.tiles): 1 tile (off) is the training default; Sa2VA's image
    # inference uses 1..max_dynamic_patch tiles by InternVL's aspect-ratio grid + a thumbnail
    tiles: bool = False
    max_dynamic_patch: int = 12
    min_dynamic_patch: int = 1
    use_thumbnail: bool = True
    # loss weights (SPEC §1)
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    lm_weight: float = 1.0
    point_sample_loss: bool = False
    num_points: int = 12544  # Mask2Former default (112*112)
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75

    # --- shapes derived from the config (never hard-coded elsewhere) -------------------------
    @property
    def patch_grid(self) -> int:
        return self.vision.image_size // self.vision.patch_size

    @property
    def prompt_grid(self) -> int:
        """Side of the image-token grid after pixel shuffle (16 for 448/14/0.5)."""
        return int(self.patch_grid * self.vision.downsample_ratio)

    @property
    def num_image_tokens(self) -> int:
        return self.prompt_grid**2

    def validate(self) -> ModelConfig:
        v = self.vision
        if v.image_size % v.patch_size:
            raise ConfigError(f"vision.image_size={v.image_size} must be a multiple of patch_size={v.patch_size}")
        side = self.patch_grid * v.downsample_ratio
        if side != int(side) or side < 1:
            raise ConfigError(
                f"vision: {self.patch_grid} patches per side with downsample_ratio={v.downsample_ratio} "
                "does not give a whole token grid"
            )
        if self.seg_answer not in SEG_ANSWER_STYLES:
            raise ConfigError(f"seg_answer={self.seg_answer!r}: choose one of {SEG_ANSWER_STYLES}")
        if not 1 <= self.min_dynamic_patch <= self.max_dynamic_patch:
            raise ConfigError(
                f"min_dynamic_patch={self.min_dynamic_patch} / max_dynamic_patch={self.max_dynamic_patch}: "
                "need 1 <= min_dynamic_patch <= max_dynamic_patch"
            )
        if self.sam2.image_size % 32:
            raise ConfigError(f"sam2.image_size={self.sam2.image_size} must be a multiple of 32")
        if len(self.sam2.hiera_stages) != len(self.sam2.hiera_window_sizes):
            raise ConfigError("sam2.hiera_stages and sam2.hiera_window_sizes must have the same length")
        if self.llm.hidden_size % self.llm.num_heads:
            raise ConfigError("llm.hidden_size must be divisible by llm.num_heads")
        return self


# ----------------------------------------------------------------------------------------------
# dict / YAML round trip


def to_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return list(cfg)
    return cfg


def from_dict(cls: type, data: dict | None, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys raise :class:`ConfigError`."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in {where or cls.__name__}; known keys: {sorted(fields)}"
        )
    kwargs = {}
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for name, value in data.items():
        sub = _dataclass_type(hints[name])
        if sub is not None and isinstance(value, dict):
            kwargs[name] = from_dict(sub, value, f"{where}.{name}" if where else name)
        elif isinstance(value, list) and "tuple" in str(hints[name]):
            kwargs[name] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


_DATACLASSES = {c.__name__: c for c in (VisionConfig, LLMConfig, SAM2Config, LoRAConfig, ModelConfig)}


def _dataclass_type(hint: Any) -> type | None:
    text = hint if isinstance(hint, str) else getattr(hint, "__name__", str(hint))
    for name, cls in _DATACLASSES.items():
        if name in text:
            return cls
    return None


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def save_yaml(data: dict, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
