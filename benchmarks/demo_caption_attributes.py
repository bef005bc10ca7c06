"""Which attributes a demo model's region captions get right (held-out shapes regions).

    python benchmarks/demo_caption_attributes.py RUN_DIR [--n 200] [--out OUT.json]

RUN_DIR is a ``maskloop demo`` run directory (its ``model/`` checkpoint folder).  Each held-out region
(``ShapesRegionCaptionDataset(n, seed="val")``, the demo's cycle regions) is captioned greedily and the
caption's size / colour / shape word and location phrase are compared with the reference caption's
(chance: 0.50 / 0.17 / 0.33 / 0.11).  Prints one line and writes JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch


def caption_attributes(run_dir: str | Path, n: int = 200, batch_size: int = 50) -> dict:
    from maskloop.data.sources.shapes import COLORS, REGION_PHRASES, SHAPES, SIZES, ShapesRegionCaptionDataset
    from maskloop.data.transforms import SampleTransform
    from maskloop.demo import MAX_NEW_TOKENS
    from maskloop.eval.caption import describe_batch
    from maskloop.eval.refer import eval_mode, loader
    from maskloop.model.checkpoints import load_pretrained

    model = load_pretrained(Path(run_dir) / "model")
    c = model.cfg
    tf = SampleTransform(image_size=c.vision.image_size, sam_size=c.sam2.image_size, prompt_grid=c.prompt_grid)
    ds = ShapesRegionCaptionDataset(n, seed="val", transform=tf)

    def first(words, vocab):
        return next((w for w in words if w in vocab), None)

    def location(text):
        return next((p for p in REGION_PHRASES.values() if text.endswith(p)), None)

    right, captions = collections.Counter(), collections.Counter()
    with eval_mode(model), torch.no_grad():
        for batch in loader(ds, batch_size, 0, None):
            _, texts = describe_batch(model, batch, MAX_NEW_TOKENS)
            for text, ref in zip(texts, batch["caption"]):
                captions[text] += 1
                for name, vocab in (("size", SIZES), ("colour", COLORS), ("shape", SHAPES)):
                    right[name] += first(text.split(), vocab) == first(ref.split(), vocab)
                right["location"] += location(text) == location(ref)
                right["exact"] += text == ref
    return {"n": n, **{k: right[k] / n for k in ("size", "colour", "shape", "location", "exact")},
            "distinct_captions": len(captions), "most_common": captions.most_common(3)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    res = caption_attributes(a.run_dir, a.n)
    print(" ".join(f"{k} {res[k]:.3f}" for k in ("size", "colour", "shape", "location", "exact")),
          f"distinct {res['distinct_captions']}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
