"""PSALM family: Swin + Phi + Mask2Former-style head, with the multi-scale deformable projector.

Modules: ``deform_attn`` (MSDeformAttn + reference / gather / Triton implementations),
``projector`` (swin_conv, DeformableProjector, region features, visual prompts), ``model``
(PSALMModel and presets), ``losses`` (Hungarian matching, PSALM criterion), ``adapt``
(baseline -> deformable checkpoint).
"""

from .deform_attn import MSDeformAttn, ms_deform_attn, ms_deform_attn_gather, ms_deform_attn_reference
from .projector import (
    DeformableProjector,
    SwinConvConnector,
    rasterize_boxes,
    rasterize_points,
    rasterize_scribbles,
    region_features,
)

__all__ = [
    "MSDeformAttn",
    "ms_deform_attn",
    "ms_deform_attn_gather",
    "ms_deform_attn_reference",
    "DeformableProjector",
    "SwinConvConnector",
    "region_features",
    "rasterize_points",
    "rasterize_scribbles",
    "rasterize_boxes",
]
