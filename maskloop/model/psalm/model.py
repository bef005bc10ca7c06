"""PSALM: Swin pyramid + Phi LLM + Mask2Former-style mask head with queries from the LLM.

Data flow (B = batch, T = prompt length, D = LLM width, C = mask-head width 256):

1. ``SwinBackbone`` -> res2..res5 ``[(B, C_l, H/4/2^l, W/4/2^l)]``.
2. ``swin_conv`` connector (res5) -> ``<image>`` tokens (B, N_img, D); its pre-flatten map
   (B, D, h, w) is the *baseline feature map* region features are sampled from.
3. Task queries z_q (B, Q, D) -- class-name embeddings (panoptic / semantic / instance),
   region features (region, cross-image), the pooled ``<refer>`` span (referring) -- go
   through the :class:`DeformableProjector` over the 4 levels -> one ``<image_deform>``
   token (B, 1, D) placed right after the image tokens (variant only).
4. The prompt's placeholder tokens receive their embeddings in one batched
   ``masked_scatter`` each: ``<image>``/``<image1>`` <- image tokens, ``<image_deform>``/
   ``<image1_deform>`` <- deform token, ``<cls>`` <- pooled class-name word embeddings,
   ``<region>`` <- region features, ``<seg>`` <- the learnable ``seg_query`` rows.
5. ``PhiForCausalLM`` -> last hidden states (B, T, D) (+ LM logits).
6. Hidden states at ``<seg>`` (B, Nq, D) -> ``seg_query_projector`` -> decoder queries; at
   ``<cls>`` -> ``class_name_projector``; at ``<region>`` -> ``region_projector``; at
   ``[SEG]`` -> ``SEG_token_projector``; the ``<refer>`` span is pooled and projected like
   a class name (one class).
7. ``Mask2FormerPixelDecoder`` (transformers) on res2..res5 -> mask features + 3 scales;
   the masked-attention decoder (transformers ``Mask2FormerTransformerModule``'s layers,
   fed our queries instead of its learned ones) -> per-layer masks (B, Nq, H/4, W/4) and
   query states (B, Nq, C).
8. Class logits by similarity, PSALM's ``forward_prediction_heads``: the decoder's normed query
   states go through PSALM's 2-layer MLPs ``predictor.CLASS_proj`` / ``REGION_proj`` / ``SEG_proj``
   (``seg_proj``), then . class-name embedding (+ a learned no-object logit; PSALM instead lists
   ``background`` among the class names), . region embedding (+ no-object), . [SEG] embedding
   (objectness; for referring PSALM's SEG embedding, the pooled ``<refer>`` span).

Token layout per task (``PSALMTokens``):
    single image : ... <image>*N_img [<image_deform>] ...  <cls>*K | <region>*R | refer text
                   ... <seg>*Nq [SEG]
    cross-image  : prompt image <image>*N_img (no deform), <region>*R, then the target image
                   <image1>*N_img <image1_deform>, <seg>*Nq [SEG]; masks are for the target.
Attribute names follow PSALM's (``seg_query``, ``seg_query_projector``,
``SEG_token_projector``, ``class_name_projector``, ``region_projector``, ``pixel_decoder``,
``predictor``) so the adapter can speak its key names.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Mask2FormerConfig, PhiConfig, PhiForCausalLM, SwinBackbone, SwinConfig
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerPixelDecoder,
    Mask2FormerTransformerModule,
)

from .projector import DeformableProjector, SwinConvConnector, region_features

__all__ = ["PSALMConfig", "PSALMTokens", "PSALMModel", "PSALMOutput", "PRESETS", "psalm_config", "TASKS",
           "PSALM_ARG_NAMES", "SWIN_TYPES", "SEG_TASKS", "seg_task_tasks"]

TASKS = ("panoptic", "semantic", "instance", "referring", "region", "cross_image")


@dataclass
class PSALMTokens:
    """Ids of the special tokens (appended after the base vocabulary by default)."""

    image: int
    image_deform: int
    image1: int
    image1_deform: int
    seg: int  # <seg> learnable query placeholder
    seg_token: int  # [SEG]
    cls: int
    region: int

    @classmethod
    def after(cls, base_vocab: int) -> PSALMTokens:
        names = ["image", "image_deform", "image1", "image1_deform", "seg", "seg_token", "cls", "region"]
        return cls(**{n: base_vocab + i for i, n in enumerate(names)})


@dataclass
class PSALMConfig:
    # Swin (transformers SwinBackbone, 4 stages = res2..res5)
    image_size: int = 1024
    swin_embed_dim: int = 128
    swin_depths: tuple[int, ...] = (2, 2, 18, 2)
    swin_heads: tuple[int, ...] = (4, 8, 16, 32)
    swin_window: int = 12
    # LLM (PhiForCausalLM); Phi-1.5 shape
    llm_hidden: int = 2048
    llm_layers: int = 24
    llm_heads: int = 32
    llm_intermediate: int = 8192
    base_vocab: int = 51200
    # Mask head (Mask2Former)
    mask_hidden: int = 256
    num_queries: int = 100
    enc_layers: int = 6
    dec_layers: int = 10  # Mask2Former convention: 9 masked-attention layers + the initial prediction
    mask_heads: int = 8
    mask_ffn: int = 2048  # masked-attention decoder FFN (Mask2Former DIM_FEEDFORWARD)
    enc_ffn: int = 1024  # pixel-decoder encoder FFN (detectron2 / PSALM hard-code 1024)
    # FPN lateral / output convs of the pixel decoder: "psalm" as PSALM's Mask2Former_Simplify
    # (convs with bias, ReLU after the lateral GroupNorm), "detectron2" as Mask2Former's own
    # (bias-free convs, no lateral activation; transformers' module as it is)
    fpn_style: str = "psalm"
    # PSALM's classification heads (MASK_FORMER.SEG_PROJ / SEG_NORM of its mask config; PSALM trains with
    # SEG_PROJ True, SEG_NORM False): ``seg_proj`` puts the 2-layer MLPs SEG_proj / CLASS_proj / REGION_proj on
    # the decoder's normed query states before each similarity; ``seg_norm`` adds LayerNorm + MLP on the [SEG]
    # and class-name embeddings (SEG_norm + seg_proj_after_norm, class_name_norm + class_name_proj_after_norm)
    seg_proj: bool = True
    seg_norm: bool = False
    # the no-object logit of the class-name tasks: "embed" a learned vector (maskloop's); "background" PSALM's
    # way -- the class name ``background`` is the last of every sample's class names (the collator appends
    # it) and its similarity is the no-object column
    no_object: str = "embed"
    # how a class name enters the prompt: "token" one <cls> position holding the name's pooled word embeddings
    # (maskloop's); "span" PSALM's -- the name's own word embeddings followed by the [SEG] embedding
    # (preprocess_class_name(CLS_token='[SEG]')), one <cls> position each, and the class-name embedding is
    # the average of the LLM's hidden states over that span (get_class_name_embedding)
    class_name_tokens: str = "token"
    gradient_checkpointing: bool = False  # Swin blocks, Phi layers, pixel-decoder encoder layers
    # Connectors
    connector_mid: int | None = None  # swin_conv inner width; default 2 * res5 dim
    deform: bool = True
    deform_hidden: int = 256
    deform_heads: int = 8
    deform_points: int = 4
    deform_pool: str = "mean"
    region_points: int = 256
    tokens: PSALMTokens | None = None
    swin_extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.tokens is None:
            self.tokens = PSALMTokens.after(self.base_vocab)

    @property
    def level_dims(self) -> tuple[int, ...]:
        return tuple(self.swin_embed_dim * 2**i for i in range(4))

    @property
    def vocab_size(self) -> int:
        return self.base_vocab + 8

    def swin_config(self) -> SwinConfig:
        return SwinConfig(
            image_size=self.image_size, embed_dim=self.swin_embed_dim, depths=list(self.swin_depths),
            num_heads=list(self.swin_heads), window_size=self.swin_window,
            out_features=["stage1", "stage2", "stage3", "stage4"], **self.swin_extra,
        )

    def phi_config(self) -> PhiConfig:
        return PhiConfig(
            vocab_size=self.vocab_size, hidden_size=self.llm_hidden, num_hidden_layers=self.llm_layers,
            num_attention_heads=self.llm_heads, intermediate_size=self.llm_intermediate,
            partial_rotary_factor=0.5, max_position_embeddings=2048,
        )

    def mask2former_config(self) -> Mask2FormerConfig:
        return Mask2FormerConfig(
            feature_size=self.mask_hidden, mask_feature_size=self.mask_hidden, hidden_dim=self.mask_hidden,
            encoder_feedforward_dim=self.enc_ffn, dim_feedforward=self.mask_ffn,
            encoder_layers=self.enc_layers, decoder_layers=self.dec_layers,
            num_attention_heads=self.mask_heads, num_queries=self.num_queries,
            backbone_config=self.swin_config(),
        )


PRESETS: dict[str, PSALMConfig] = {
    # test size: 64 px input, 2-layer Phi of width 64, 32-wide mask head
    "psalm-tiny": PSALMConfig(
        image_size=64, swin_embed_dim=16, swin_depths=(1, 1, 1, 1), swin_heads=(1, 2, 2, 4), swin_window=2,
        llm_hidden=64, llm_layers=2, llm_heads=4, llm_intermediate=128, base_vocab=128,
        mask_hidden=32, num_queries=6, enc_layers=1, dec_layers=3, mask_heads=2, mask_ffn=64, enc_ffn=64,
        connector_mid=64, deform_hidden=32, deform_heads=2, deform_points=2, region_points=16,
    ),
    "psalm-swinb-phi15": PSALMConfig(),
    "psalm-swinl-phi15": PSALMConfig(swin_embed_dim=192, swin_heads=(6, 12, 24, 48)),
    # docs/architecture.md names 2560 as the Phi-3 width; 2560/32 layers is the Phi-2 shape (PhiForCausalLM).
    "psalm-swinb-phi2560": PSALMConfig(llm_hidden=2560, llm_layers=32, llm_heads=32, llm_intermediate=10240),
}


#: PSALM's training-script argument names -> PSALMConfig fields (the deformable projector's
#: ``mm_hidden_dim / mm_n_heads / mm_n_points``). ``projector_outdim`` (the connectors' output
#: width) must equal the LLM width and ``swin_type`` picks the Swin-B / Swin-L shapes.
PSALM_ARG_NAMES = {"mm_hidden_dim": "deform_hidden", "mm_n_heads": "deform_heads", "mm_n_points": "deform_points"}
SWIN_TYPES = {"base": {"swin_embed_dim": 128, "swin_heads": (4, 8, 16, 32)},
              "large": {"swin_embed_dim": 192, "swin_heads": (6, 12, 24, 48)}}
#: PSALM's ``--seg_task`` -> the tasks its mask decoder evaluates (``mask_decoder_training_init``).
SEG_TASKS = {"semantic": ("semantic",), "instance": ("instance",), "panoptic": ("semantic", "instance", "panoptic"),
             "referring": ("referring",), "region": ("region",)}


def seg_task_tasks(seg_task: str) -> tuple[str, ...]:
    """The tasks PSALM's ``--seg_task`` switches on (a ``+``-joined list mixes them)."""
    out: list[str] = []
    for part in seg_task.split("+"):
        if part not in SEG_TASKS:
            raise ValueError(f"unknown seg_task {part!r}; one of {sorted(SEG_TASKS)} (join with '+' to mix)")
        out += [t for t in SEG_TASKS[part] if t not in out]
    return tuple(out)


def psalm_config(name: str, **overrides) -> PSALMConfig:
    """A preset with field overrides; PSALM's argument names (:data:`PSALM_ARG_NAMES`,
    ``swin_type``, ``projector_outdim``) are accepted too."""
    if name not in PRESETS:
        raise KeyError(f"unknown PSALM preset {name!r}; choose one of {sorted(PRESETS)}")
    overrides = dict(overrides)
    for psalm_name, field_name in PSALM_ARG_NAMES.items():
        if psalm_name in overrides:
            overrides[field_name] = overrides.pop(psalm_name)
    if "swin_type" in overrides:
        st = overrides.pop("swin_type")
        if st not in SWIN_TYPES:
            raise ValueError(f"swin_type must be one of {sorted(SWIN_TYPES)}, got {st!r}")
        overrides = {**SWIN_TYPES[st], **overrides}
    outdim = overrides.pop("projector_outdim", None)
    cfg = replace(PRESETS[name], **overrides)
    if outdim is not None and int(outdim) != cfg.llm_hidden:
        raise ValueError(f"projector_outdim={outdim} but the LLM width is {cfg.llm_hidden}: PSALM's connectors "
                         "project into the LLM's embedding space; pick the preset of that LLM")
    return cfg


@dataclass
class PSALMOutput:
    pred_masks: list[torch.Tensor]  # per decoder layer (B, Nq, h, w), last = final
    class_logits: list[torch.Tensor] | None  # per layer (B, Nq, K+1), last column = no object
    region_logits: list[torch.Tensor] | None  # per layer (B, Nq, R+1)
    seg_logits: list[torch.Tensor]  # per layer (B, Nq) objectness
    lm_logits: torch.Tensor | None  # (B, T, V)
    lm_loss: torch.Tensor | None
    deform_tokens: torch.Tensor | None  # (B, 1 or Q, D)


class PSALMMLP(nn.Module):
    """PSALM's ``MLP(d, d, d, n)``: Linear layers ``layers.{i}``, ReLU between them (not after the last)."""

    def __init__(self, dim: int, num_layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class _QueryDecoder(nn.Module):
    """Mask2Former masked-attention decoder (transformers module) with external queries, and PSALM's
    classification heads on its normed query states (``SEG_proj`` / ``CLASS_proj`` / ``REGION_proj``,
    PSALM's ``forward_prediction_heads``)."""

    def __init__(self, config: Mask2FormerConfig, seg_proj: bool = True, seg_norm: bool = False):
        super().__init__()
        # reuse transformers' module for its layers; its own learned queries are unused
        self.module = Mask2FormerTransformerModule(in_features=config.feature_size, config=config)
        del self.module.queries_embedder, self.module.queries_features
        self.query_pos = nn.Embedding(config.num_queries, config.hidden_dim)
        C = config.hidden_dim
        self.seg_proj, self.seg_norm = seg_proj, seg_norm
        if seg_proj:  # PSALM leaves them at nn.Linear's default init
            self.SEG_proj, self.CLASS_proj, self.REGION_proj = PSALMMLP(C), PSALMMLP(C), PSALMMLP(C)
        if seg_norm:
            self.SEG_norm, self.class_name_norm = nn.LayerNorm(C), nn.LayerNorm(C)
            self.seg_proj_after_norm, self.class_name_proj_after_norm = PSALMMLP(C), PSALMMLP(C)

    def head_states(self, kind: str, states: torch.Tensor) -> torch.Tensor:
        """Normed query states (B, Nq, C) through the ``kind`` ('SEG' / 'CLASS' / 'REGION') MLP."""
        return getattr(self, f"{kind}_proj")(states) if self.seg_proj else states

    def seg_embedding(self, emb: torch.Tensor) -> torch.Tensor:
        return self.seg_proj_after_norm(self.SEG_norm(emb)) if self.seg_norm else emb

    def class_name_embedding(self, emb: torch.Tensor) -> torch.Tensor:
        return self.class_name_proj_after_norm(self.class_name_norm(emb)) if self.seg_norm else emb

    def forward(self, queries: torch.Tensor, multi_scale: list[torch.Tensor], mask_features: torch.Tensor):
        """queries (B, Nq, C) -> (masks [(B, Nq, h, w)] per layer, states [(B, Nq, C)] per layer)."""
        m = self.module
        feats, pos, sizes = [], [], []
        for i in range(m.num_feature_levels):
            x = multi_scale[i]
            sizes.append(x.shape[-2:])
            pos.append(m.position_embedder(x.shape, x.device, x.dtype, None).flatten(2).permute(2, 0, 1))
            feats.append((m.input_projections[i](x).flatten(2) + m.level_embed.weight[i][None, :, None])
                         .permute(2, 0, 1))
        B, Nq, _ = queries.shape
        if Nq > self.query_pos.num_embeddings:
            raise ValueError(f"{Nq} <seg> queries but the decoder has {self.query_pos.num_embeddings}")
        qpos = self.query_pos.weight[:Nq, None].expand(Nq, B, -1)
        out = m.decoder(
            inputs_embeds=queries.transpose(0, 1), multi_stage_positional_embeddings=pos,
            pixel_embeddings=mask_features, encoder_hidden_states=feats, query_position_embeddings=qpos,
            feature_size_list=sizes, return_dict=True,
        )
        states = [h.transpose(0, 1) for h in out.intermediate_hidden_states]
        return list(out.masks_queries_logits), states


def _psalm_fpn(pixel_decoder: nn.Module, feature_channels: list[int], dim: int) -> None:
    """Make the FPN convs of transformers' pixel decoder PSALM's (``Mask2Former_Simplify``):
    lateral ``Conv2d(bias) -> GroupNorm(32) -> ReLU``, output ``Conv2d 3x3(bias) -> GroupNorm -> ReLU``
    (detectron2's lateral conv has no bias and no activation, its output conv no bias)."""
    lateral, output = [], []
    for idx in range(pixel_decoder.num_fpn_levels):
        lat = nn.Sequential(nn.Conv2d(feature_channels[idx], dim, kernel_size=1), nn.GroupNorm(32, dim), nn.ReLU())
        out = nn.Sequential(nn.Conv2d(dim, dim, kernel_size=3, padding=1), nn.GroupNorm(32, dim), nn.ReLU())
        for conv in (lat[0], out[0]):  # detectron2's c2_xavier_fill: kaiming_uniform(a=1), zero bias
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)
        setattr(pixel_decoder, f"adapter_{idx + 1}", lat)
        setattr(pixel_decoder, f"layer_{idx + 1}", out)
        lateral.append(lat)
        output.append(out)
    pixel_decoder.lateral_convolutions = lateral[::-1]
    pixel_decoder.output_convolutions = output[::-1]


def _scatter_rows(embeds: torch.Tensor, where: torch.Tensor, rows: torch.Tensor, what: str) -> torch.Tensor:
    """Put ``rows`` (N, D) into the positions ``where`` (B, T) of ``embeds`` (B, T, D), in order."""
    n = int(where.sum())
    if n != rows.shape[0]:
        raise ValueError(f"prompt has {n} {what} token(s) but {rows.shape[0]} embedding(s) were computed; "
                         f"build the prompt with one {what} token per embedding")
    if n == 0:
        return embeds
    return embeds.masked_scatter(where[..., None], rows.to(embeds.dtype))


def _gather_rows(hidden: torch.Tensor, where: torch.Tensor, count: int) -> torch.Tensor:
    """Hidden (B, T, D) at ``where`` (B, T) with exactly ``count`` hits per row -> (B, count, D)."""
    B = hidden.shape[0]
    per = where.sum(1)
    if bool((per != count).any()):
        raise ValueError(f"expected {count} marked tokens per sample, got {per.tolist()}")
    return hidden[where].view(B, count, -1)


class PSALMModel(nn.Module):
    def __init__(self, config: PSALMConfig):
        super().__init__()
        self.config = config
        c = config
        self.vision_tower = SwinBackbone(c.swin_config())
        self.mm_projector = SwinConvConnector(c.level_dims[-1], c.llm_hidden, c.connector_mid)
        self.deform_projector = (
            DeformableProjector(c.level_dims, c.deform_hidden, c.deform_heads, c.deform_points, c.llm_hidden,
                                pool=c.deform_pool)
            if c.deform else None
        )
        self.llm = PhiForCausalLM(c.phi_config())
        m2f = c.mask2former_config()
        self.pixel_decoder = Mask2FormerPixelDecoder(m2f, feature_channels=list(c.level_dims))
        if c.fpn_style == "psalm":
            _psalm_fpn(self.pixel_decoder, list(c.level_dims), c.mask_hidden)
        elif c.fpn_style != "detectron2":
            raise ValueError(f"fpn_style must be 'psalm' or 'detectron2', got {c.fpn_style!r}")
        if c.class_name_tokens not in ("token", "span"):
            raise ValueError(f"class_name_tokens must be 'token' or 'span' (PSALM's), got {c.class_name_tokens!r}")
        if c.no_object not in ("embed", "background"):
            raise ValueError(f"no_object must be 'embed' or 'background' (PSALM's), got {c.no_object!r}")
        self.predictor = _QueryDecoder(m2f, seg_proj=c.seg_proj, seg_norm=c.seg_norm)
        self.seg_query = nn.Parameter(torch.zeros(c.num_queries, c.llm_hidden))
        self.seg_query_projector = nn.Linear(c.llm_hidden, c.mask_hidden)
        self.SEG_token_projector = nn.Linear(c.llm_hidden, c.mask_hidden)
        self.class_name_projector = nn.Linear(c.llm_hidden, c.mask_hidden)
        self.region_projector = nn.Linear(c.llm_hidden, c.mask_hidden)
        self.no_object_embed = nn.Parameter(torch.zeros(c.mask_hidden))
        nn.init.normal_(self.seg_query, std=0.02)
        with torch.no_grad():  # the transformers module leaves these uninitialised
            nn.init.normal_(self.pixel_decoder.level_embed, std=0.02)
        if c.gradient_checkpointing:
            self.gradient_checkpointing_enable()

    def gradient_checkpointing_enable(self) -> None:
        """Recompute activations in backward: the Phi layers (PSALM's ``--gradient_checkpointing``,
        the HF Trainer's switch on the LLM) and the Swin blocks (only matters when it is trained)."""
        for m in (self.llm, self.vision_tower):
            if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.2x name
                m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # -- pieces ---------------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor):
        """(B, 3, H, W) -> (levels [res2..res5], image tokens (B, N, D), baseline map (B, D, h, w))."""
        levels = list(self.vision_tower(pixel_values).feature_maps)
        fmap = self.mm_projector.feature_map(levels[-1])
        return levels, fmap.flatten(2).transpose(1, 2), fmap

    def word_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids)

    def class_name_spans(self, class_name_ids, class_name_mask, class_valid):
        """PSALM's class-name spans: (rows (N, D) = each valid class's word embeddings then the [SEG]
        embedding, in prompt order; owner (N,) = the flat (b * K + k) class index of each row)."""
        B, K, L = class_name_ids.shape
        e = self.word_embeddings(class_name_ids)  # (B, K, L, D)
        seg = self.word_embeddings(torch.full((B, K, 1), self.config.tokens.seg_token, device=e.device))
        keep = torch.cat([class_name_mask.bool() & class_valid[..., None], class_valid[..., None]], dim=2)
        owner = torch.arange(B * K, device=e.device).view(B, K, 1).expand(B, K, L + 1)[keep]
        return torch.cat([e, seg], dim=2)[keep], owner

    def class_name_embeddings(self, class_name_ids: torch.Tensor, class_name_mask: torch.Tensor) -> torch.Tensor:
        """Pooled word embeddings of each category name: (B, K, Lc) -> (B, K, D)."""
        e = self.word_embeddings(class_name_ids)
        m = class_name_mask.to(e.dtype)[..., None]
        return (e * m).sum(2) / m.sum(2).clamp_min(1.0)

    # -- forward --------------------------------------------------------------------------

    def forward(
        self,
        task: str,
        pixel_values: torch.Tensor,  # (B, 3, H, W) the image masks are predicted for
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T)
        labels: torch.Tensor | None = None,  # (B, T) LM targets, -100 = ignore
        class_name_ids: torch.Tensor | None = None,  # (B, K, Lc)
        class_name_mask: torch.Tensor | None = None,  # (B, K, Lc)
        class_valid: torch.Tensor | None = None,  # (B, K) bool; padded categories False
        region_masks: torch.Tensor | None = None,  # (B, R, Hm, Wm) on the prompt image
        region_valid: torch.Tensor | None = None,  # (B, R) bool
        refer_mask: torch.Tensor | None = None,  # (B, T) bool: tokens of the referring expression
        prompt_pixel_values: torch.Tensor | None = None,  # (B, 3, H, W) cross-image prompt image
    ) -> PSALMOutput:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; one of {TASKS}")
        c, tok = self.config, self.config.tokens
        B = input_ids.shape[0]
        levels, img_tokens, fmap = self.image_features(pixel_values)
        embeds = self.word_embeddings(input_ids)  # (B, T, D)

        z_q, q_mask = None, None
        if task in ("panoptic", "semantic", "instance"):
            cls_emb = self.class_name_embeddings(class_name_ids, class_name_mask)  # (B, K, D)
            if class_valid is None:
                class_valid = torch.ones(cls_emb.shape[:2], dtype=torch.bool, device=cls_emb.device)
            if c.class_name_tokens == "span":
                rows, cls_owner = self.class_name_spans(class_name_ids, class_name_mask, class_valid)
            else:
                rows = cls_emb[class_valid]
            embeds = _scatter_rows(embeds, input_ids == tok.cls, rows, "<cls>")
            z_q, q_mask = cls_emb, class_valid
        elif task in ("region", "cross_image"):
            if region_valid is None:
                region_valid = torch.ones(region_masks.shape[:2], dtype=torch.bool, device=region_masks.device)
            src_map = fmap
            if task == "cross_image":
                _, prompt_tokens, src_map = self.image_features(prompt_pixel_values)
                embeds = _scatter_rows(embeds, input_ids == tok.image, prompt_tokens.reshape(-1, c.llm_hidden),
                                       "<image>")
            reg = region_features(src_map, region_masks, c.region_points)  # (B, R, D)
            embeds = _scatter_rows(embeds, input_ids == tok.region, reg[region_valid], "<region>")
            z_q, q_mask = reg, region_valid
        elif task == "referring":
            m = refer_mask.to(embeds.dtype)[..., None]
            z_q = ((embeds * m).sum(1) / m.sum(1).clamp_min(1.0))[:, None]  # (B, 1, D)

        image_tok, deform_tok = (tok.image1, tok.image1_deform) if task == "cross_image" else (
            tok.image, tok.image_deform)
        embeds = _scatter_rows(embeds, input_ids == image_tok, img_tokens.reshape(-1, c.llm_hidden),
                               "image")
        deform = None
        if self.deform_projector is not None:
            deform = self.deform_projector(z_q, levels, q_mask)  # (B, 1 or Q, D)
            embeds = _scatter_rows(embeds, input_ids == deform_tok, deform.reshape(-1, c.llm_hidden),
                                   "<image_deform>")
        seg_where = input_ids == tok.seg
        nq = int(seg_where[0].sum())
        embeds = _scatter_rows(embeds, seg_where, self.seg_query[:nq].repeat(B, 1), "<seg>")

        llm_out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels,
                           output_hidden_states=True, return_dict=True)
        hidden = llm_out.hidden_states[-1]  # (B, T, D)

        queries = self.seg_query_projector(_gather_rows(hidden, seg_where, nq))  # (B, Nq, C)
        P = self.predictor
        refer_pooled = None
        if task == "referring":  # PSALM's get_SEG_embedding: the <refer> span's hidden states, average-pooled
            m = refer_mask.to(hidden.dtype)[..., None]
            refer_pooled = ((hidden * m).sum(1) / m.sum(1).clamp_min(1.0))[:, None]  # (B, 1, D)
            seg_src = refer_pooled
        else:  # PSALM has no [SEG] embedding here; ours is the [SEG] token's hidden state
            seg_src = _gather_rows(hidden, input_ids == tok.seg_token, 1)
        seg_emb = P.seg_embedding(self.SEG_token_projector(seg_src))  # (B, 1, C)
        pix = self.pixel_decoder(levels)
        masks, states = P(queries, list(pix.multi_scale_features), pix.mask_features)

        # PSALM's forward_prediction_heads: each similarity sees the normed query states through its MLP
        class_logits = region_logits = None
        noobj = self.no_object_embed
        if task in ("panoptic", "semantic", "instance", "referring"):
            if task == "referring":
                names = refer_pooled
                valid = torch.ones(B, 1, dtype=torch.bool, device=hidden.device)
            else:
                K = class_valid.shape[1]
                if c.class_name_tokens == "span":  # average over each class's span (PSALM's class_name_pooling)
                    h = hidden[input_ids == tok.cls]
                    sums = h.new_zeros(B * K, h.shape[-1]).index_add_(0, cls_owner, h)
                    n = torch.bincount(cls_owner, minlength=B * K).clamp_min(1).to(h.dtype)
                    names = (sums / n[:, None]).view(B, K, -1)
                else:
                    names = torch.zeros(B, K, c.llm_hidden, dtype=hidden.dtype, device=hidden.device)
                    names = names.masked_scatter(class_valid[..., None], hidden[input_ids == tok.cls])
                valid = class_valid
            names = P.class_name_embedding(self.class_name_projector(names))
            if task != "referring" and c.no_object == "background":
                class_logits = [self._background_similarity(P.head_states("CLASS", s), names, valid) for s in states]
            else:
                class_logits = [self._similarity(P.head_states("CLASS", s), names, valid, noobj) for s in states]
        if task in ("region", "cross_image"):
            R = region_valid.shape[1]
            regs = torch.zeros(B, R, c.llm_hidden, dtype=hidden.dtype, device=hidden.device)
            regs = regs.masked_scatter(region_valid[..., None], hidden[input_ids == tok.region])
            regs = self.region_projector(regs)
            region_logits = [self._similarity(P.head_states("REGION", s), regs, region_valid, noobj) for s in states]
        seg_logits = [(P.head_states("SEG", s) * seg_emb).sum(-1) for s in states]
        return PSALMOutput(masks, class_logits, region_logits, seg_logits, llm_out.logits,
                           llm_out.loss if labels is not None else None, deform)

    @staticmethod
    def _background_similarity(states, emb, valid):
        """PSALM's no-object: the last valid class of each row is ``background``. -> (B, Nq, K+1): its
        similarity moved to the last column, its own column -inf (no target points at it)."""
        logits = torch.einsum("bqc,bkc->bqk", states, emb).masked_fill(~valid[:, None, :], float("-inf"))
        bg = (valid.sum(1) - 1).clamp_min(0)  # (B,)
        bg_col = logits.gather(2, bg[:, None, None].expand(-1, logits.shape[1], 1))
        at_bg = F.one_hot(bg, logits.shape[2]).bool()[:, None, :]
        return torch.cat([logits.masked_fill(at_bg, float("-inf")), bg_col], dim=-1)

    @staticmethod
    def _similarity(states, emb, valid, noobj):
        """states (B, Nq, C) . emb (B, K, C) -> (B, Nq, K+1); padded columns -inf; last = no object."""
        logits = torch.einsum("bqc,bkc->bqk", states, emb)
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
        return torch.cat([logits, (states * noobj).sum(-1, keepdim=True)], dim=-1)


def build_prompt_ids(
    config: PSALMConfig,
    task: str,
    text_ids: list[int],
    n_image_tokens: int,
    n_queries: int,
    n_cls: int = 0,
    n_regions: int = 0,
    refer_ids: list[int] | None = None,
    cls_lengths: list[int] | None = None,
) -> tuple[list[int], list[bool]]:
    """One prompt's ids and refer mask, in the layout of the module docstring (no tokenizer).

    ``text_ids`` is the instruction text (already tokenised); ``refer_ids`` the expression;
    ``cls_lengths`` (``class_name_tokens: span``): the span length of each class name (its tokens + 1
    for [SEG]), in place of ``n_cls`` single positions.
    """
    if cls_lengths is not None:
        n_cls = int(sum(cls_lengths))
    tok = config.tokens
    ids: list[int] = []
    if task == "cross_image":
        ids += [tok.image] * n_image_tokens + [tok.region] * n_regions + text_ids
        ids += [tok.image1] * n_image_tokens + ([tok.image1_deform] if config.deform else [])
    else:
        ids += [tok.image] * n_image_tokens + ([tok.image_deform] if config.deform else [])
        ids += text_ids + [tok.cls] * n_cls + [tok.region] * n_regions
    refer = [False] * len(ids)
    if refer_ids:
        ids += list(refer_ids)
        refer += [True] * len(refer_ids)
    ids += [tok.seg] * n_queries + [tok.seg_token]
    refer += [False] * (n_queries + 1)
    return ids, refer


def n_image_tokens(config: PSALMConfig) -> int:
    """Number of ``<image>`` tokens for the configured input size (res5 stride 32, then /2)."""
    s = config.image_size // 32
    s = (s + 1) // 2
    return s * s


# convenience for callers that want the interpolated final masks
def upsample_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
