"""Model and dataset construction from a :class:`~maskloop.config.TrainConfig` (the Sa2VA-family recipes)."""

from __future__ import annotations

from maskloop.config import ConfigError, TrainConfig

__all__ = ["build_model", "build_source"]


def build_model(cfg: TrainConfig):
    from maskloop.model.checkpoints import load_pretrained, load_published_state, read_state_file
    from maskloop.model.grounded import GroundedMLLM
    from maskloop.model.presets import FROM_SCRATCH_PRESETS, PRESETS, get_preset

    if cfg.model in PRESETS:
        from maskloop.data.sources.shapes import all_words
        from maskloop.model.init import init_from_scratch, init_recency_prior, init_seg_embedding_zero
        from maskloop.model.prompts import build_word_tokenizer

        if cfg.model not in FROM_SCRATCH_PRESETS:
            raise ConfigError(
                f"preset {cfg.model!r} needs a real tokenizer: pass the checkpoint folder as `model` instead"
            )
        model = GroundedMLLM(get_preset(cfg.model), build_word_tokenizer(all_words()))
        if cfg.scratch_init and cfg.init_from is None:
            init_from_scratch(model)
            if cfg.recency_init:
                init_recency_prior(model, cfg.recency_init)
            if cfg.zero_seg_embed:
                init_seg_embedding_zero(model)
    else:
        from pathlib import Path

        if not Path(cfg.model).exists():
            raise ConfigError(f"model checkpoint folder not found: {cfg.model} (set `model:` to a preset "
                              f"{sorted(PRESETS)} or a Sa2VA checkpoint folder)")
        # a training .pth as init_from: its weights, and the template its companion config names
        weights = cfg.init_from if cfg.init_from and str(cfg.init_from).endswith(".pth") else None
        model = load_pretrained(cfg.model, weights=weights)
    if cfg.init_from and not (cfg.model not in PRESETS and str(cfg.init_from).endswith(".pth")):
        load_published_state(model, read_state_file(cfg.init_from))
    model.set_trainable(cfg.freeze)
    return model


def build_source(spec: dict, model, where: str = "data"):
    """One dataset from a spec such as ``{kind: refcoco, root: ..., split: train}``; a spec without ``kind``, of
    an unknown kind or with a key its dataset does not take is a :class:`ConfigError` naming ``where``."""
    import inspect

    from maskloop.data import sources as S
    from maskloop.data.sources import shapes
    from maskloop.data.tiles import transform_for

    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: a data source spec is a mapping like {{kind: refcoco, root: ...}}, got {spec!r}")
    spec = dict(spec)
    kind = spec.pop("kind", None)
    spec.pop("repeat", None)
    spec.pop("weight", None)
    c = model.cfg
    tf = transform_for(c)  # InternVL's tiles when the model config asks (tiles: true), else one 448 tile
    kinds = {
        "shapes_refer": shapes.ShapesReferDataset,
        "shapes_caption": shapes.ShapesRegionCaptionDataset,
        "shapes_pairs": shapes.ShapesPairDataset,
        "shapes_masks": shapes.ShapesMaskOnlyDataset,
        "refcoco": S.RefCOCODataset,
        "dam": S.DAMDataset,
        "sa1b": S.SA1BDataset,
        "sav": S.SAVDataset,
        "sav_pairs": S.SAVPairsDataset,
        "openimages": S.OpenImagesDataset,
        **S.OWN_KINDS,  # your own data: coco / folder / sa2va (data/sources/own_*.py)
    }
    if kind is None:
        raise ConfigError(f"{where}: the data source spec {spec} has no `kind`; known kinds: {sorted(kinds)}")
    if kind not in kinds:
        raise ConfigError(f"{where}: unknown data source kind {kind!r}; known: {sorted(kinds)}")
    params = inspect.signature(kinds[kind]).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        known = sorted(n for n in params if n not in ("self", "transform"))
        unknown = sorted(set(spec) - set(known))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown} for data source kind {kind!r}; "
                              f"known: {known + ['kind', 'repeat', 'weight']}")
        needed = sorted(n for n in known if params[n].default is params[n].empty
                        and params[n].kind not in (params[n].VAR_POSITIONAL, params[n].VAR_KEYWORD))
        missing = [n for n in needed if n not in spec]
        if missing:
            raise ConfigError(f"{where}: data source kind {kind!r} needs key(s) {missing}")
    return kinds[kind](transform=tf, **spec)
