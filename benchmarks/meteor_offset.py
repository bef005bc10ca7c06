"""How far the Java-free ``METEOR-nosyn`` reads from METEOR 1.5 (pycocoevalcap's Java scorer).

Captions of the shapes world (``caption_for``), predictions made from the references by seeded
edits (word substitutions from the shapes vocabulary, word drops, a swapped reference of another
scene), scored by both on the same PTB tokens.  Needs ``java`` on the PATH.

    python benchmarks/meteor_offset.py --n 300 --out results/meteor_offset.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def make_pairs(n: int, seed: int, mode: str) -> tuple[dict, dict]:
    from maskloop.data.sources.shapes import SHAPES_VOCAB, ShapesRegionCaptionDataset

    ds = ShapesRegionCaptionDataset(n, seed="val", mllm_size=16, sam_size=16, prompt_grid=4)
    rng = random.Random(seed)
    words = sorted(set(SHAPES_VOCAB))
    refs = {i: [ds.raw(i)["caption"]] for i in range(n)}
    preds = {}
    for i in range(n):
        toks = refs[i][0].split()
        if mode == "substitute":
            toks = [rng.choice(words) if rng.random() < 0.3 else t for t in toks]
        elif mode == "drop":
            toks = [t for t in toks if rng.random() > 0.3] or toks[:1]
        elif mode == "other_scene":
            toks = refs[(i + 1) % n][0].split()
        preds[i] = " ".join(toks)
    return preds, refs


def main(argv=None) -> dict:
    from maskloop.eval.caption_metrics import caption_scores
    from maskloop.eval.ptb import java_available

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if not java_available():
        raise SystemExit("java is not on the PATH: METEOR 1.5 cannot run (apt-get install default-jre-headless)")
    rows = []
    for mode in ("substitute", "drop", "other_scene"):
        preds, refs = make_pairs(a.n, 0, mode)
        s = caption_scores(preds, refs, metrics=["METEOR", "METEOR-nosyn"])
        rows.append({"edit": mode, "n": a.n, "METEOR": s["METEOR"], "METEOR-nosyn": s["METEOR-nosyn"],
                     "offset": s["METEOR-nosyn"] - s["METEOR"]})
    print(f"{'edit':<12} {'n':>5} {'METEOR':>8} {'nosyn':>8} {'offset':>8}")
    for r in rows:
        print(f"{r['edit']:<12} {r['n']:>5} {r['METEOR']:8.4f} {r['METEOR-nosyn']:8.4f} {r['offset']:+8.4f}")
    mean = sum(r["offset"] for r in rows) / len(rows)
    print(f"mean offset (nosyn - METEOR): {mean:+.4f}")
    res = {"rows": rows, "mean_offset": mean}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
