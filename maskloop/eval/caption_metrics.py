"""Region-caption metrics: the COCO-caption pipeline (pycocoevalcap), METEOR 1.5 through Java.

The pipeline (as ``pycocoevalcap.eval.COCOEvalCap`` runs it)
-----------------------------------------------------------
1. **PTB tokenization** of every prediction and reference: :func:`maskloop.eval.ptb.ptb_tokenize`,
   Stanford PTBTokenizer's rules in Python + pycocoevalcap's punctuation strip (checked token for
   token against the Java tokenizer in the tests).  An empty prediction is a zero-length caption
   (``""``), exactly what pycocoevalcap scores for one.
2. **BLEU-1..4, ROUGE-L, CIDEr(-D)**: pycocoevalcap's own pure-Python scorers on those token
   streams (its ``Cider`` is CIDEr-D: clipped counts, Gaussian length penalty sigma 6, x10).
3. **METEOR** (1.5): pycocoevalcap's ``Meteor``, i.e. ``meteor-1.5.jar -l en -norm`` with its
   exact / stem / synonym / paraphrase modules, run whenever ``java`` is on the PATH
   (Debian/Ubuntu: ``apt-get install default-jre-headless``).  Without Java there is no ``METEOR``
   key (never a stand-in under that name).

Other scores, under their own names
-----------------------------------
* ``METEOR-nosyn``: nltk's METEOR with exact + Porter-stem matching only (no WordNet, no
  paraphrase table; nothing downloaded), on the same PTB tokens.  It is **not** METEOR 1.5 and
  is not comparable with published METEOR: its fragmentation penalty and parameters differ
  (nltk: alpha 0.9, beta 3, gamma 0.5; METEOR 1.5 ``en``: alpha 0.85, beta 0.2, gamma 0.6, delta 0.75
  with function-word weighting), and it reads **higher** than METEOR 1.5 on the same captions:
  measured **+0.29** on average (nosyn − METEOR: +0.30 with 30% words substituted, +0.31 with 30%
  dropped, +0.25 for another scene's caption; 300 captions each) by ``benchmarks/meteor_offset.py``
  on shapes-world captions.  The offset depends on the data: use it only to compare our own runs.
* ``chrF`` (sacrebleu; character n-gram F-score on the raw strings).

Notes
-----
* CIDEr's IDF weights come from the references of the evaluated set: a corpus-level number.
* Scales: BLEU / ROUGE-L / METEOR in [0, 1], CIDEr in [0, 10] (x10 as in the COCO toolkit),
  chrF in [0, 100].
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable, Mapping, Sequence

from maskloop.eval.ptb import java_available, ptb_tokenize

#: Every metric name; ``METEOR`` needs Java (:func:`default_metrics` leaves it out without it).
ALL_METRICS: tuple[str, ...] = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr", "METEOR", "METEOR-nosyn",
                                "chrF")


def default_metrics() -> tuple[str, ...]:
    """:data:`ALL_METRICS`, without ``METEOR`` when no Java runtime is on the PATH or the environment sets
    ``MASKLOOP_METEOR=off`` (the JVM and METEOR's paraphrase table take 5-45 s to start, once per process)."""
    if java_available() and os.environ.get("MASKLOOP_METEOR", "on").lower() not in ("off", "0", "no"):
        return ALL_METRICS
    return tuple(m for m in ALL_METRICS if m != "METEOR")


def tokenize(text: str) -> list[str]:
    """The tokens pycocoevalcap scores (:func:`maskloop.eval.ptb.ptb_tokenize`)."""
    return ptb_tokenize(text)


def meteor_java(refs: Mapping[Hashable, Sequence[str]], hyps: Mapping[Hashable, Sequence[str]]) -> tuple[float, list]:
    """pycocoevalcap's METEOR 1.5 (Java) on tokenized ``{id: [ref, ...]}`` / ``{id: [hyp]}``."""
    if not java_available():
        raise RuntimeError("METEOR 1.5 needs a Java runtime on the PATH (apt-get install default-jre-headless)")
    global _METEOR
    if _METEOR is None:  # one JVM per process (start-up and the paraphrase table take seconds)
        from pycocoevalcap.meteor.meteor import Meteor

        _METEOR = Meteor()
    score, scores = _METEOR.compute_score(dict(refs), dict(hyps))
    return float(score), [float(x) for x in scores]


_METEOR = None


class _NoSynonyms:
    """Stands in for nltk's WordNet reader: METEOR then uses exact + stem matches only."""

    def synsets(self, *args, **kwargs):
        return []


def _check_inputs(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> list[Hashable]:
    ids = list(references.keys())
    if not ids:
        raise ValueError("caption_scores: no references given")
    missing = [i for i in ids if i not in predictions]
    if missing:
        raise ValueError(
            f"caption_scores: {len(missing)} reference id(s) have no prediction (e.g. {missing[:3]}); "
            "pass a prediction for every id ('' for an empty caption)"
        )
    extra = [i for i in predictions if i not in references]
    if extra:
        raise ValueError(f"caption_scores: {len(extra)} prediction id(s) have no references (e.g. {extra[:3]})")
    for i in ids:
        refs = references[i]
        if isinstance(refs, str):
            raise TypeError(f"references[{i!r}] must be a list of strings, got a single string")
        if len(refs) == 0:
            raise ValueError(f"references[{i!r}] is empty: every id needs at least one reference caption")
    return ids


def caption_scores(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    metrics: Iterable[str] | None = None,
) -> dict[str, float]:
    """Corpus-level caption metrics.

    predictions: id -> generated caption; references: id -> list of reference captions
    (the same ids). ``metrics``: a subset of :data:`ALL_METRICS` (default :func:`default_metrics`:
    all, METEOR when Java is present). Returns name -> score.
    """
    metrics = list(default_metrics() if metrics is None else metrics)
    unknown = sorted(set(metrics) - set(ALL_METRICS))
    if unknown:
        raise ValueError(f"unknown caption metric(s) {unknown}; choose from {list(ALL_METRICS)}")
    ids = _check_inputs(predictions, references)

    # Token streams, keyed by position (pycocoevalcap wants {key: [space-joined tokens]}).
    hyp_tok = {}
    ref_tok = {}
    for k, i in enumerate(ids):
        hyp_tok[k] = [" ".join(ptb_tokenize(predictions[i]))]  # "" for an empty caption, as pycocoevalcap
        ref_tok[k] = [" ".join(ptb_tokenize(r)) for r in references[i]]

    out: dict[str, float] = {}
    if any(m.startswith("BLEU") for m in metrics):
        from pycocoevalcap.bleu.bleu import Bleu

        bleu, _ = Bleu(4).compute_score(ref_tok, hyp_tok, verbose=0)
        for n in range(1, 5):
            if f"BLEU-{n}" in metrics:
                out[f"BLEU-{n}"] = float(bleu[n - 1])
    if "ROUGE-L" in metrics:
        from pycocoevalcap.rouge.rouge import Rouge

        rouge, _ = Rouge().compute_score(ref_tok, hyp_tok)
        out["ROUGE-L"] = float(rouge)
    if "CIDEr" in metrics:
        from pycocoevalcap.cider.cider import Cider

        cider, _ = Cider().compute_score(ref_tok, hyp_tok)
        out["CIDEr"] = float(cider)
    if "METEOR" in metrics:
        out["METEOR"] = meteor_java(ref_tok, hyp_tok)[0]  # pycocoevalcap's Meteor, as COCOEvalCap calls it
    if "METEOR-nosyn" in metrics:
        from nltk.translate.meteor_score import meteor_score

        wn = _NoSynonyms()
        scores = []
        for k in hyp_tok:
            h = hyp_tok[k][0].split()
            refs = [r.split() for r in ref_tok[k] if r]
            scores.append(float(meteor_score(refs, h, wordnet=wn)) if h and any(refs) else 0.0)
        out["METEOR-nosyn"] = sum(scores) / len(scores)
    if "chrF" in metrics:
        from sacrebleu.metrics import CHRF

        n_refs = max(len(references[i]) for i in ids)
        # sacrebleu wants reference *streams*; None pads ids with fewer references
        streams = [
            [references[i][j] if j < len(references[i]) else None for i in ids] for j in range(n_refs)
        ]
        out["chrF"] = float(CHRF().corpus_score([predictions[i] for i in ids], streams).score)
    return {m: out[m] for m in metrics}


__all__ = ["ALL_METRICS", "caption_scores", "default_metrics", "meteor_java", "tokenize"]
