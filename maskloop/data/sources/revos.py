"""ReVOS as released (cilinyan/ReVOS-api)::

    ReVOS/JPEGImages/<video>/<frame>.jpg          (train and valid videos together)
    ReVOS/mask_dict.json                          {str(anno_id): [COCO RLE or null per frame]}
    ReVOS/mask_dict_foreground.json               (foreground masks; not used for scoring)
    ReVOS/meta_expressions_train_.json            {"videos": {<video>: {"vid_id", "frames": [...],
    ReVOS/meta_expressions_valid_.json              "expressions": {<exp_id>: {"exp", "obj_id", "anno_id",
                                                                               "type_id"}}}}}

The same ``meta_expressions`` + ``mask_dict`` format as MeViS (:mod:`.mevis`).  ``type_id`` says
whether an expression is a referring one (0) or a reasoning question (1): ReVOS reports J, F and J&F
for each and overall, so expressions are grouped ``referring`` / ``reasoning`` (``other`` for any
other value).  Video names may hold a ``/`` (the source dataset's folder), kept as is.
"""

from __future__ import annotations

from pathlib import Path

from .mevis import MetaExpressionsDataset

TYPE_GROUPS = {0: "referring", 1: "reasoning"}


def _group(ex: dict) -> str:
    try:
        return TYPE_GROUPS.get(int(ex.get("type_id", 0)), "other")
    except (TypeError, ValueError):
        return "other"


class ReVOSDataset(MetaExpressionsDataset):
    """``ReVOSDataset(root, split="valid")`` with ``root`` the ``ReVOS`` folder."""

    name = "revos"

    def __init__(self, root, split: str = "valid", clip_len: int | None = None, seed: int = 0,
                 max_retries: int = 16):
        root = Path(root)
        meta = root / f"meta_expressions_{split}_.json"
        mask = root / "mask_dict.json"
        super().__init__(root / "JPEGImages", meta, mask if mask.is_file() else None, clip_len=clip_len, seed=seed,
                         group_of=_group, max_retries=max_retries)


__all__ = ["ReVOSDataset", "TYPE_GROUPS"]
