"""Region-caption metrics against reference captions, with no Java and no downloads.

Packages and why
----------------
* ``pycocoevalcap`` (the COCO caption evaluation code, PyPI) for **BLEU-1..4**,
  **ROUGE-L** and **CIDEr** — these three scorers are pure Python and are the
  implementations region-captioning papers report (its ``Cider`` class is CIDEr-D:
  clipped n-gram counts and the Gaussian length penalty, sigma 6, x10). We do *not*
  use its ``PTBTokenizer``, ``Meteor`` or ``Spice``: they shell out to Java. We tokenize
  in Python instead (:func:`tokenize`: lower-case, split words and punctuation, drop
  the punctuation tokens PTBTokenizer drops), which matches the Java tokenizer on plain
  captions; on punctuation-heavy text numbers may differ slightly from published ones.
* ``sacrebleu`` (maintained, pure Python) for **chrF** (character n-gram F-score,
  corpus level, its own standard tokenization on the raw strings).
* ``nltk`` (maintained, pure Python) for **METEOR** — with a limit: real METEOR needs
  WordNet synonyms (Java METEOR 1.5 also its paraphrase table). The WordNet data is a
  separate download (``nltk.download('wordnet')``), which this project never does, so
  we run nltk's METEOR with exact + Porter-stem matching only (an empty synonym
  source). That score is reported as ``METEOR-nosyn``: it is systematically a little
  lower than METEOR with synonyms and **not comparable to published METEOR numbers**;
  use it to compare our own runs. (If you need the published number, run the Java
  METEOR of pycocoevalcap yourself on the same token streams.)

Notes
-----
* CIDEr's IDF weights come from the reference captions of the evaluated set, so it is
  only meaningful over a corpus (tens of samples or more); a single sample scores 0.
* An empty prediction is scored as a caption that matches nothing (0 for that sample).
* All scores are the packages' native scales: BLEU/ROUGE-L/METEOR in [0, 1], CIDEr
  in [0, 10] (x10 as in the COCO toolkit), chrF in [0, 100].
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Mapping, Sequence

# PTBTokenizer (pycocoevalcap) drops these tokens after tokenizing.
_PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_BRACKETS = frozenset("(){}[]")  # PTB turns these into -LRB- etc.; we drop them as punctuation
# words (with inner apostrophes / hyphens / dots in numbers), clitics, or single symbols
_TOKEN_RE = re.compile(r"\.\.\.|--|n't|'[a-z]+|[a-z0-9]+(?:[-.][a-z0-9]+)*|[^\sa-z0-9]")
# Stand-ins for an empty prediction / reference (the tokenizer never produces "<"+word+">")
_EMPTY = "<empty>"
_NOREF = "<noref>"

ALL_METRICS: tuple[str, ...] = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr", "METEOR-nosyn", "chrF")


def tokenize(text: str) -> list[str]:
    """PTB-style tokens of a caption, lower-cased, punctuation removed (as COCO eval does)."""
    text = text.lower()
    # split "don't" -> "do n't" the PTB way before matching
    text = re.sub(r"([a-z])n't\b", r"\1 n't", text)
    return [t for t in _TOKEN_RE.findall(text) if t not in _PTB_PUNCTUATION and t not in _BRACKETS]


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
    metrics: Iterable[str] = ALL_METRICS,
) -> dict[str, float]:
    """Corpus-level caption metrics.

    predictions: id -> generated caption; references: id -> list of reference captions
    (the same ids). ``metrics``: a subset of :data:`ALL_METRICS`. Returns name -> score.
    """
    metrics = list(metrics)
    unknown = sorted(set(metrics) - set(ALL_METRICS))
    if unknown:
        raise ValueError(f"unknown caption metric(s) {unknown}; choose from {list(ALL_METRICS)}")
    ids = _check_inputs(predictions, references)

    # Token streams, keyed by position (pycocoevalcap wants {key: [space-joined tokens]}).
    hyp_tok = {}
    ref_tok = {}
    for k, i in enumerate(ids):
        h = tokenize(predictions[i])
        hyp_tok[k] = [" ".join(h) if h else _EMPTY]
        ref_tok[k] = [" ".join(tokenize(r)) or _NOREF for r in references[i]]

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
    if "METEOR-nosyn" in metrics:
        from nltk.translate.meteor_score import meteor_score

        wn = _NoSynonyms()
        scores = []
        for k in hyp_tok:
            h = hyp_tok[k][0].split()
            refs = [r.split() for r in ref_tok[k]]
            scores.append(0.0 if h == [_EMPTY] else float(meteor_score(refs, h, wordnet=wn)))
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


__all__ = ["ALL_METRICS", "caption_scores", "tokenize"]
