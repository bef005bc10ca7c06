"""Typed configuration: the single source of defaults.

Every shape the model uses (tile size, token grid, SAM input size, prompt width) is read from
:class:`ModelConfig`, so a tiny preset can run on small images on a CPU while the published presets
carry the real Sa2VA shapes.  Configs round-trip through plain dicts / YAML; unknown keys are an
error that names the key and the section it was found in.
"""

from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from maskloop.errors import ConfigError

__all__ = ["ConfigError", "ModelConfig", "TrainConfig", "SFTConfig", "Loop1Config", "Loop2Config", "DualConfig",
           "PsalmConfig", "RECIPES", "from_dict", "to_dict", "apply_overrides", "load_yaml", "save_yaml"]


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
    # which ViT layer's output feeds mlp1 (Sa2VA / InternVL ``select_layer``; -1 = the last)
    select_layer: int = -1


@dataclass
class LLMConfig:
    """The LLM (frozen base + LoRA); ``architecture`` picks its family (maskloop.model.families)."""

    architecture: str = "Qwen2ForCausalLM"  # llm_config.architectures[0]: Qwen2 / InternLM2 / Llama
    vocab_size: int = 151_674
    hidden_size: int = 2048
    num_layers: int = 36
    num_heads: int = 16
    num_kv_heads: int = 2
    intermediate_size: int = 11008
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False  # True: lm_head is the embedding matrix (a checkpoint carries no lm_head)
    rope_scaling: dict | None = None  # {"type": "linear" | "dynamic", "factor": f} as in the checkpoint
    attention_bias: bool = False  # q/k/v/o biases of Llama-class families (InternLM2's ``bias``); Qwen2: q/k/v always


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
    # which decoder output a language ([SEG]) prompt gets (maskloop.model.sam2_head): "best_iou" = Sa2VA's
    # rule in training and inference (multimask tokens 1-3, the one with the highest predicted IoU; the loss
    # is on it); "single" = token 0 (SAM2's single-mask output), for decoders trained from scratch.
    language_mask: str = "best_iou"
    # language_mask="single" only: SAM2's eval-time fallback from token 0 to the best multimask token when
    # token 0's mask looks unstable (SAM2's image-predictor default; Sa2VA never reaches it, since it asks
    # for the multimask output).  Off for models trained from scratch, whose multimask tokens never train.
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
    # chat template, a key of maskloop.model.prompts.TEMPLATES (a published config.json names its own)
    template: str = "phi3_chat"
    # referring answer: "fixed" = "Sure, [SEG]." (Sa2VA); "phrase" = "Sure, <p>{expr}</p> [SEG]." (model/prompts.py)
    seg_answer: str = "fixed"
    # InternVL dynamic tiling (config.json max/min_dynamic_patch, use_thumbnail).  ``tiles`` False: one tile
    # (the consistency-training recipe's default); the tiling itself is implemented by the data transform.
    tiles: bool = False
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    # mask loss weights (docs/architecture.md, "Losses"); the LM weight is the recipe's
    bce_weight: float = 2.0
    dice_weight: float = 0.5
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
        from maskloop.model.prompts import template_name

        self.template = template_name(self.template)  # unknown -> ConfigError naming the supported ones
        if self.seg_answer not in SEG_ANSWER_STYLES:
            raise ConfigError(f"seg_answer={self.seg_answer!r}: choose one of {SEG_ANSWER_STYLES}")
        if self.sam2.language_mask not in ("best_iou", "single"):
            raise ConfigError(f"sam2.language_mask={self.sam2.language_mask!r}: choose 'best_iou' (Sa2VA) or 'single'")
        if not 1 <= self.min_dynamic_patch <= self.max_dynamic_patch:
            raise ConfigError(
                f"min_dynamic_patch={self.min_dynamic_patch} / max_dynamic_patch={self.max_dynamic_patch}: "
                "need 1 <= min_dynamic_patch <= max_dynamic_patch"
            )
        if self.sam2.image_size % 32:
            raise ConfigError(f"sam2.image_size={self.sam2.image_size} must be a multiple of 32")
        if len(self.sam2.hiera_stages) != len(self.sam2.hiera_window_sizes):
            raise ConfigError("sam2.hiera_stages and sam2.hiera_window_sizes must have the same length")
        from maskloop.model.families import family
        from maskloop.model.families.llama import ROPE_TYPES

        try:
            family(self.llm.architecture)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        rs = self.llm.rope_scaling
        if rs and rs.get("rope_type", rs.get("type")) not in ROPE_TYPES:
            raise ConfigError(f"llm.rope_scaling={rs}: supported types are {ROPE_TYPES}")
        if not 1 <= self.min_dynamic_patch <= self.max_dynamic_patch:
            raise ConfigError(f"min_dynamic_patch={self.min_dynamic_patch} / max_dynamic_patch={self.max_dynamic_patch}:"
                              " need 1 <= min <= max")
        if not -v.num_layers <= v.select_layer < v.num_layers + 1 or v.select_layer == 0:
            raise ConfigError(f"vision.select_layer={v.select_layer}: a ViT layer index in -{v.num_layers}..-1 "
                              f"or 1..{v.num_layers}")
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
    """Build dataclass ``cls`` from ``data``, each value coerced to its field's declared type.

    Unknown keys, wrong types and values outside a ``Literal`` raise :class:`ConfigError` naming the
    key (dotted, from the top of the config), the value and what was expected.  Nested dataclasses,
    ``X | None``, ``tuple[...]`` and ``Literal[...]`` come from the type hints; YAML 1.1 reads ``1e-5``
    as a string, so a float field accepts a string that parses as a float.
    """
    if data is None:
        return None
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if k not in _REMOVED_KEYS.get(cls.__name__, ())}
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where or cls.__name__}; known keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: coerce(value, hints[name], f"{where}.{name}" if where else name) for name, value in data.items()}
    return cls(**kwargs)


# keys that configs written by earlier versions carry and nothing reads any more (dropped on load)
_REMOVED_KEYS = {"ModelConfig": ("lm_weight",)}


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as type ``hint`` (see :func:`from_dict`), or :class:`ConfigError` naming ``key``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def bad() -> ConfigError:
        return ConfigError(f"{key}={value!r}: expected {_type_name(hint)}")

    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        options = [a for a in args if a is not type(None)]
        # a list goes to a tuple member, a mapping to a dataclass member, a scalar to a scalar member
        for a in sorted(options, key=lambda a: not _accepts_shape(a, value)):
            try:
                return coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise bad()
    if origin is Literal:
        if value not in args:
            raise bad()
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{key}={value!r}: expected {len(args)} values")
        return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))) if args else tuple(value)
    if origin in (list, dict) or hint in (list, dict):
        if not isinstance(value, origin or hint):
            raise bad()
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if hint is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise bad() from None
            if not f.is_integer():
                raise bad()
            return int(f)
        if not isinstance(value, int):
            raise bad()
        return value
    if hint is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, str):  # YAML 1.1: 1e-5 (no dot) is a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        if not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad()
        return value
    return value


def _accepts_shape(hint: Any, value: Any) -> bool:
    origin = typing.get_origin(hint)
    if isinstance(value, (list, tuple)):
        return origin in (tuple, list) or hint in (tuple, list)
    if isinstance(value, dict):
        return dataclasses.is_dataclass(hint) or origin is dict or hint is dict
    return not (origin in (tuple, list, dict) or dataclasses.is_dataclass(hint))


def check_range(key: str, value: Any, ok: bool, expected: str) -> None:
    """Raise :class:`ConfigError` ``key=value: expected ...`` unless ``ok`` (used by ``__post_init__``)."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected {expected}")


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """A copy of ``data`` with each ``key=value`` (``--set``) applied; the value is parsed as YAML and a
    dotted key sets a nested one (``loop1.tau=0.5``).  Types are checked later, by :func:`from_dict`."""
    import yaml

    out = dict(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e.__class__.__name__})") from None
        *parents, last = key.strip().split(".")
        node = out
        for p in parents:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[last] = value
    return out


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open() as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:  # one line: the file, line and column, and what the parser met
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{where}: YAML syntax error: {what}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def save_yaml(data: dict, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


# ----------------------------------------------------------------------------------------------
# training: the Trainer's settings and one typed section per recipe (docs/recipes.md)

# recipe name -> "module:Class" of its implementation.  The CLI resolves it (maskloop.recipes.get) and hands
# the recipe to the Trainer; the Trainer itself never imports the recipes package.
RECIPES: dict[str, str] = {
    "sft": "maskloop.recipes.sft:SFT",
    "loop1": "maskloop.recipes.loop1:Loop1",
    "loop2": "maskloop.recipes.loop2:Loop2",
    "dual": "maskloop.recipes.dual:Dual",
    "psalm": "maskloop.recipes.psalm:PSALM",
}


@dataclass
class SFTConfig:
    """Supervised fine-tuning: referring segmentation + region captioning."""

    lm_weight: float = 1.0
    """Weight of the LM cross-entropy of the referring answer ("Sure, [SEG].")."""

    def __post_init__(self):
        check_range("sft.lm_weight", self.lm_weight, self.lm_weight >= 0, "a weight >= 0")


@dataclass
class Loop1Config:
    """Loop 1: mask -> caption (EMA teacher, token noise, Gumbel) -> mask."""

    caption_len: int = 64
    """T: the teacher's fixed caption length (greedy, no EOS stop)."""
    noise_ratio: float = 0.25
    """Fraction of caption tokens replaced by random allowed ids before forward #1."""
    topk: int = 128
    """k of the straight-through Gumbel-softmax over the vocabulary."""
    tau: float = 0.7
    """Gumbel-softmax temperature."""
    mask_caption_padding: bool = True
    """Hide the caption's padding from forward #2 (False reproduces the research code)."""
    variant: Literal["gumbel", "generate"] = "gumbel"
    """"generate": segment the teacher's tokens directly (no gradient into the captioner)."""
    lm_weight: float = 1.0
    """Weight of the LM loss on the fixed "Sure, [SEG]." answer (and of referring batches)."""
    refer_ratio: float = 0.25
    """Referring batches per Loop-1 batch, interleaved through the run (0: none)."""
    overlap_encoders: bool = True
    """On CUDA, run image 2's frozen encoders (SAM2's Hiera + neck, the ViT) on a second stream beside the
    teacher's decoding (the same numbers; False: inline, in the order of the steps)."""
    overlap_start: Literal["step", "decode"] = "step"
    """When the side stream's encoders are launched: at the start of the step ("step"), or once the teacher's
    decoding is queued ("decode"), so that they share the GPU with the memory-bound decoding only and the
    host launches them while the GPU decodes."""

    def __post_init__(self):
        check_range("loop1.caption_len", self.caption_len, self.caption_len >= 1, "an integer >= 1")
        check_range("loop1.noise_ratio", self.noise_ratio, 0 <= self.noise_ratio < 1, "a fraction in [0, 1)")
        check_range("loop1.topk", self.topk, self.topk >= 1, "an integer >= 1")
        check_range("loop1.tau", self.tau, self.tau > 0, "a temperature > 0")
        check_range("loop1.lm_weight", self.lm_weight, self.lm_weight >= 0, "a weight >= 0")
        check_range("loop1.refer_ratio", self.refer_ratio, self.refer_ratio >= 0, "a ratio >= 0")


@dataclass
class Loop2Config:
    """Loop 2: caption -> mask -> caption on region captions."""

    caption_len: int = 64
    """Captions are cut to this many tokens."""
    seg_lm_weight: float = 1.0
    """Weight of the LM loss on the segmentation answer of half A."""

    def __post_init__(self):
        check_range("loop2.caption_len", self.caption_len, self.caption_len >= 1, "an integer >= 1")
        check_range("loop2.seg_lm_weight", self.seg_lm_weight, self.seg_lm_weight >= 0, "a weight >= 0")


@dataclass
class DualConfig:
    """Loop 1 + Loop 2 (their own sections) combined by gradient surgery."""

    surgery_beta: float = 0.5
    """beta of g = g1 + beta (g2 - c g1)."""
    surgery_mode: Literal["always", "pcgrad"] = "always"
    """"always" applies the combination every step; "pcgrad" only when g1.g2 < 0."""

    def __post_init__(self):
        check_range("dual.surgery_beta", self.surgery_beta, 0 <= self.surgery_beta <= 1, "a value in [0, 1]")


_PSALM_SEG_TASKS = ("semantic", "instance", "panoptic", "referring", "region")


@dataclass
class PsalmConfig:
    """PSALM joint segmentation training (the model is the TrainConfig's ``model`` preset)."""

    data: list = field(default_factory=list)
    """Source specs ``{kind, ..., repeat}``: coco_panoptic, coco_semantic, coco_instances, coco_interactive,
    coco_interactive_cross, refcoco."""
    model_overrides: dict = field(default_factory=dict)
    """PSALMConfig fields, e.g. ``{deform: false}``."""
    tokenizer: str | None = None
    """A local Hugging Face tokenizer folder; None: a word tokenizer (tiny preset)."""
    model_name_or_path: str | None = None
    """PSALM's start, its argument names: a Hugging Face Phi folder (phi-1_5) for the LLM."""
    vision_tower: str | None = None
    """detectron2's Mask2Former ``model_final_*.pkl`` (Swin + pixel decoder + decoder layers)."""
    pretrain_mm_mlp_adapter: str | None = None
    """A baseline ``mm_projector.bin``."""
    psalm_checkpoint: str | None = None
    """A full PSALM checkpoint (pytorch_model.bin / safetensors / folder, PSALM's module names)."""
    train_backbone: bool = False
    """Train the Swin tower (PSALM keeps it frozen)."""
    image_size: int | None = None
    """None: the preset's (1024)."""
    mask_size: int | None = None
    """Target resolution; None: image_size."""
    single_task_batches: bool = True
    """Every batch from one source (PSALM's per-dataset batches)."""
    epochs: int = 10
    """Length of the run when ``steps`` is not set."""
    num_points: int = 12544
    """Points sampled per mask for BCE / Dice (Mask2Former's 112 x 112)."""
    deep_supervision: bool = True
    """Loss on every decoder layer's predictions."""
    lm_weight: float = 1.0
    """Weight of the [SEG] LM term."""
    cross_image: bool = False
    """Train the cross-image task (regions on a prompt image segmented in a target image) from the
    ``coco_interactive_cross`` sources of ``data``; such a source needs it and it needs one."""
    seg_task: str = "panoptic"
    """PSALM's ``--seg_task``: the inferences its evaluation runs on COCO panoptic data (``panoptic`` =
    panoptic + semantic + instance, ``semantic``, ``instance``; ``referring`` / ``region`` switch those off).
    It does not choose training data (neither does PSALM's); ``data_ratio`` does."""
    data_ratio: str | None = None
    """PSALM's ``--data_ratio`` ``"a||b||c||d"``: repeats of the panoptic (coco_panoptic / coco_semantic /
    coco_instances) || referring (refcoco) || region (coco_interactive) || LLaVA-conversation sources; the
    last must be 0 (no conversation reader here). None: each source's ``repeat``."""
    task_switch: int | None = None
    """PSALM's ``UnifyDatasetSingleDatasetForBatch`` mixing: visit the sources in turn, this many samples
    (a multiple of the batch size; PSALM's script: 16) from each. None: shuffle the single-source batches."""

    def __post_init__(self):
        bad = [t for t in str(self.seg_task).split("+") if t not in _PSALM_SEG_TASKS]  # model.psalm.SEG_TASKS' keys
        if bad:
            raise ConfigError(f"psalm.seg_task: unknown {bad}; one of {list(_PSALM_SEG_TASKS)} (join with '+')")
        if self.task_switch is not None:
            check_range("psalm.task_switch", self.task_switch, self.task_switch >= 1, "an integer >= 1 or null")
        check_range("psalm.epochs", self.epochs, self.epochs >= 1, "an integer >= 1")
        check_range("psalm.num_points", self.num_points, self.num_points >= 1, "an integer >= 1")


@dataclass
class TrainConfig:
    """The Trainer's settings (any recipe) and the recipes' typed sections (only the chosen one's are read)."""

    recipe: str = "sft"
    """One of :data:`RECIPES`."""
    model: str = "tiny"
    """A preset name or a checkpoint folder."""
    init_from: str | None = None
    """A checkpoint whose weights initialise the model."""
    scratch_init: bool = False
    """A preset built without a checkpoint gets width-aware weights (model/init.py), not N(0, 0.02)."""
    recency_init: float = 0.0
    """With scratch_init: strength of the LLM attention's recency prior at init (0 = none)."""
    zero_seg_embed: bool = False
    """With scratch_init: the [SEG] token's input embedding starts at zero (model/init.py)."""
    run_dir: str = "runs/default"
    steps: int | None = 1000
    """Optimizer steps; None: the recipe's (PSALM: ``psalm.epochs`` over its data)."""
    batch_size: int = 2
    """Per GPU, per stream."""
    accumulation: int = 4
    lr: float | None = None
    """None: the recipe's default (:data:`RECIPE_DEFAULTS`)."""
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.05
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0
    compile_layers: bool = False
    """torch.compile each LLM decoder layer (regional; CUDA runs, first steps slower)."""
    compile_encoders: bool = False
    """torch.compile each InternViT layer and SAM2 Hiera block (regional; with ``compile_layers`` the fastest
    Loop-1 step measured, benchmarks/results/gpu_loop1.md)."""
    cuda_graphs: bool = False
    """With ``compile_layers`` on CUDA: the compiled LLM layers replay as CUDA graphs (torch.compile mode
    "reduce-overhead", cudagraph trees; one recording per distinct input shape, see ``pad_length_to``)."""
    pad_length_to: int | None = None
    """Pad every assembled prompt's length up to a multiple of this (more left padding, fewer distinct shapes);
    None: 32 with ``cuda_graphs``, else 1 (no padding)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU."""
    freeze: str | tuple[str, ...] = "default"
    """"default", "all", or the parameter groups to train (a list, or names joined by commas)."""
    ema_decay: float = 0.999
    """EMA of the trained parameters (the Loop-1 teacher); 0: no EMA."""
    seed: int = 0
    ckpt_every: int = 250
    """Checkpoint every N steps (0: never; the last step is saved when > 0)."""
    keep_last: int = 3
    log_every: int = 10
    logging: Literal["tensorboard", "wandb"] = "tensorboard"
    """Where the scalars (and a demo's example grids) go besides metrics.jsonl: TensorBoard (``tb/``) or
    Weights & Biases (``pip install 'maskloop[wandb]'``; project ``wandb_project``)."""
    wandb_project: str = "maskloop"
    wandb_offline: bool = False
    """W&B without a network: the run is written under ``<run_dir>/wandb`` (as ``WANDB_MODE=offline``)."""
    max_nonfinite: int = 10
    """Stop after this many consecutive non-finite steps (each skipped)."""
    num_workers: int = 0
    progress: bool = True
    distributed: Literal["none", "ddp", "fsdp"] = "none"
    """Data parallelism under torchrun (maskloop/train/sharding.py): none (flat all-reduce), ddp, fsdp (FSDP2)."""
    fsdp_shard_frozen: bool = True
    """FSDP: shard the frozen base too (false: keep it whole on every rank, shard only the trained weights)."""
    activation_checkpointing: bool = False
    """Recompute each LLM / ViT / SAM2 block in the backward pass instead of keeping its activations."""
    global_batch: int | None = None
    """Samples per optimizer step; when set, batch_size = global_batch / (world size x accumulation)."""
    data: dict = field(default_factory=dict)
    """Stream name -> list of source specs ``{kind, ..., repeat, weight}``."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    loop1: Loop1Config = field(default_factory=Loop1Config)
    loop2: Loop2Config = field(default_factory=Loop2Config)
    dual: DualConfig = field(default_factory=DualConfig)
    psalm: PsalmConfig = field(default_factory=PsalmConfig)

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {self.recipe!r}; choose one of {sorted(RECIPES)}")
        if self.lr is None:
            self.lr = RECIPE_DEFAULTS[self.recipe]["lr"]
        self.betas = tuple(self.betas)
        if isinstance(self.freeze, list):
            self.freeze = tuple(self.freeze)
        check_range("steps", self.steps, self.steps is None or self.steps >= 0, "an integer >= 0 or null")
        check_range("batch_size", self.batch_size, self.batch_size >= 1, "an integer >= 1")
        check_range("accumulation", self.accumulation, self.accumulation >= 1, "an integer >= 1")
        check_range("lr", self.lr, self.lr > 0, "a learning rate > 0")  # .inf passes: NonFiniteGuard stops it
        check_range("weight_decay", self.weight_decay, self.weight_decay >= 0, "a value >= 0")
        check_range("betas", self.betas, all(0 <= b < 1 for b in self.betas), "two values in [0, 1)")
        check_range("warmup_ratio", self.warmup_ratio, 0 <= self.warmup_ratio <= 1, "a fraction in [0, 1]")
        check_range("grad_clip", self.grad_clip, self.grad_clip > 0, "a norm > 0")
        check_range("ema_decay", self.ema_decay, 0 <= self.ema_decay < 1, "a decay in [0, 1)")
        check_range("ckpt_every", self.ckpt_every, self.ckpt_every >= 0, "an integer >= 0")
        check_range("keep_last", self.keep_last, self.keep_last >= 1, "an integer >= 1")
        check_range("log_every", self.log_every, self.log_every >= 1, "an integer >= 1")
        check_range("max_nonfinite", self.max_nonfinite, self.max_nonfinite >= 1, "an integer >= 1")
        check_range("num_workers", self.num_workers, self.num_workers >= 0, "an integer >= 0")
        if self.recency_init < 0 or (self.recency_init and not self.scratch_init):
            raise ConfigError(f"recency_init={self.recency_init}: a strength > 0 that needs scratch_init: true "
                              "(it is an initialisation of a model trained from random weights)")
        check_range("pad_length_to", self.pad_length_to, self.pad_length_to is None or self.pad_length_to >= 1,
                    "an integer >= 1 or null")
        if self.cuda_graphs and not self.compile_layers:
            raise ConfigError("cuda_graphs: true needs compile_layers: true (the graphs are of the compiled layers)")
        if self.zero_seg_embed and not self.scratch_init:
            raise ConfigError("zero_seg_embed: true needs scratch_init: true "
                              "(it is an initialisation of a model trained from random weights)")

    @classmethod
    def from_yaml(cls, path, overrides: list[str] | None = None) -> TrainConfig:
        return cls.from_mapping(load_yaml(path), overrides)

    @classmethod
    def from_mapping(cls, data: dict, overrides: list[str] | None = None) -> TrainConfig:
        """The config from a YAML mapping and ``--set`` overrides; the recipe's defaults fill the keys the
        mapping leaves out; old flat recipe keys (``tau: 0.5``) are moved to their section with one
        deprecation line."""
        data = nest_flat_keys(apply_overrides(data, overrides))
        recipe = data.get("recipe", "sft")
        if recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
        return from_dict(cls, {**RECIPE_DEFAULTS[recipe], **data}, "")


# the Trainer settings a recipe changes from TrainConfig's (its published hyperparameters)
RECIPE_DEFAULTS: dict[str, dict] = {
    "sft": {"lr": 4e-5},
    "loop1": {"lr": 1e-5},
    "loop2": {"lr": 1e-5},
    "dual": {"lr": 1e-5},
    # PSALM scripts/train.sh: AdamW without weight decay, 3% warmup, 10 epochs, batch 2 x accumulation 2
    "psalm": {"model": "psalm-swinb-phi15", "lr": 6e-5, "weight_decay": 0.0, "warmup_ratio": 0.03, "steps": None,
              "batch_size": 2, "accumulation": 2, "ema_decay": 0.0, "ckpt_every": 15000, "keep_last": 1,
              "log_every": 1, "num_workers": 4, "run_dir": "runs/psalm"},
}

# old flat keys -> their sections (one mapping; each use prints one deprecation line)
_FLAT_KEYS: dict[str, tuple[str, ...]] = {
    "caption_len": ("loop1", "loop2"), "noise_ratio": ("loop1",), "topk": ("loop1",), "tau": ("loop1",),
    "mask_caption_padding": ("loop1",), "variant": ("loop1",), "refer_ratio": ("loop1",),
    "lm_weight": ("sft", "loop1"), "seg_lm_weight": ("loop2",), "surgery_beta": ("dual",), "surgery_mode": ("dual",),
}
# the PSALM recipe's flat keys (the PSALM_DEFAULTS layout of recipes/psalm.py)
_FLAT_PSALM = {f.name for f in dataclasses.fields(PsalmConfig)}


def nest_flat_keys(data: dict, warn: bool = True) -> dict:
    """``data`` with the old flat recipe keys moved into their sections (``tau`` -> ``loop1.tau``)."""
    out = dict(data)
    psalm = out.get("recipe") == "psalm"
    moved = []
    for key in list(out):
        if psalm and key in _FLAT_PSALM and not (key == "data" and isinstance(out[key], dict)):
            sections = ("psalm",)
        elif psalm and key == "max_steps":
            out["steps"] = out.pop("max_steps")
            moved.append("max_steps -> steps")
            continue
        elif key in _FLAT_KEYS:
            sections = _FLAT_KEYS[key]
        else:
            continue
        value = out.pop(key)
        for s in sections:
            section = dict(out.get(s) or {})
            section.setdefault(key, value)
            out[s] = section
        moved.append(f"{key} -> " + ", ".join(f"{s}.{key}" for s in sections))
    if moved and warn:
        warnings.warn("flat recipe keys are deprecated, use the recipe sections: " + "; ".join(moved),
                      FutureWarning, stacklevel=3)
    return out
