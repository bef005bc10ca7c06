import os
import socket

import pytest
import torch

# METEOR 1.5 starts a JVM (5-45 s): only the tests that ask for "METEOR" by name run it (test_caption_pipeline.py)
os.environ.setdefault("MASKLOOP_METEOR", "off")

from maskloop.model.grounded import GroundedMLLM
from maskloop.model.presets import get_preset
from maskloop.model.prompts import build_word_tokenizer

WORDS = ["a", "red", "blue", "green", "small", "large", "circle", "square", "triangle", "left", "of", "right"]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_word_tokenizer(WORDS)


def make_tiny(seed: int = 0, **overrides) -> GroundedMLLM:
    torch.manual_seed(seed)
    cfg = get_preset("tiny")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return GroundedMLLM(cfg, build_word_tokenizer(WORDS))


@pytest.fixture()
def tiny_model():
    return make_tiny()


def tiny_batch(model: GroundedMLLM, B: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    S, G = model.cfg.vision.image_size, model.cfg.sam2.image_size
    pv = torch.randn(B, 3, S, S, generator=g)
    gp = torch.randint(0, 256, (B, 3, G, G), generator=g, dtype=torch.uint8)
    masks = (torch.rand(B, G, G, generator=g) > 0.6).float()
    return pv, gp, masks


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (a process group's or a local server's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank, world, port):
    """torchrun's environment for one of ``world`` local processes (the trainer creates the group)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def export_tiny_with_shape(root):
    """A random tiny model exported as a checkpoint folder (``root/ckpt``), a shapes image (``img.png``) and
    its object mask (``mask.png``) under ``root``; returns ``root``."""
    import numpy as np
    from PIL import Image

    from maskloop.data.sources.shapes import ShapesReferDataset
    from maskloop.model.checkpoints import save_published
    from maskloop.train.engine import TrainConfig, build_model

    torch.manual_seed(0)
    save_published(build_model(TrainConfig.from_mapping({"model": "tiny"})), root / "ckpt")
    raw = ShapesReferDataset(1, seed="val").raw(0)
    Image.fromarray(raw["image"]).save(root / "img.png")
    Image.fromarray(raw["mask"].astype(np.uint8) * 255).save(root / "mask.png")
    return root


def corrupt_video_source(tmp_path, kind: str):
    """(fixture info, dataset) of a MeViS ``valid_u`` or ReVOS ``valid`` fixture written with bad files."""
    from maskloop.data.fixtures import write_mevis, write_revos
    from maskloop.data.sources.mevis import MeViSDataset
    from maskloop.data.sources.revos import ReVOSDataset

    if kind == "mevis":
        info = write_mevis(tmp_path, "valid_u", corrupt=True)
        return info, MeViSDataset(info["root"])
    info = write_revos(tmp_path, corrupt=True)
    return info, ReVOSDataset(info["root"], "valid")


def selected_lm_loss(logits, labels):
    """Reference LM loss: logits (N, V) at the supervised positions, labels (N,) -> mean CE (0 if none)."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(logits.float(), labels)
