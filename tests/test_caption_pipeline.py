"""The COCO-caption pipeline: PTB tokenization construct by construct, empty captions, METEOR 1.5 via Java."""

from __future__ import annotations

import shutil

import pytest

from maskloop.eval.caption_metrics import caption_scores
from maskloop.eval.ptb import java_ptb_tokenize, ptb_tokenize, ptb_tokens_raw

# (input, the tokens pycocoevalcap scores: Stanford PTBTokenizer 3.4.1 -preserveLines -lowerCase + its strip)
CONSTRUCTS = [
    ('He said "hello" to me.', "he said hello to me"),  # double quotes -> `` '' (stripped)
    ("it's 'quoted' text `here'", "it 's quoted text here"),  # single quotes -> ` ' (stripped)
    ("a (brown) [red] {blue} dog", "a -lrb- brown -rrb- -lsb- red -rsb- -lcb- blue -rcb- dog"),  # brackets kept
    ("The U.S. flag, Mr. Smith, e.g. a.m. and etc. too", "the u.s. flag mr. smith e.g. a.m. and etc. too"),
    ("in the U.S.", "in the u.s."),  # a final acronym keeps its period
    ("A young boy, approx. 5 years old.", "a young boy approx 5 years old"),  # unknown abbreviation: split
    ("no. 5 and vol. 2", "no. 5 and vol 2"),
    ("10,000 people ate 1/2 of it at 3:30 and 1,000.50", "10,000 people ate 1/2 of it at 3:30 and 1,000.50"),
    ("a ½ cup", "a 1/2 cup"),  # unicode fractions spelled out
    ("-5 +3 3-5 meters 10-15 ft.", "-5 +3 3-5 meters 10-15 ft."),
    ("50% off $5.99 #1 @home & more", "50 % off $ 5.99 # 1 @home & more"),
    ("x*y=z a+b c++ 2x4 1st", "x * y = z a + b c++ 2x4 1st"),
    ("Café crème à la mode naïve résumé ÀÉÎ Straße", "café crème à la mode naïve résumé àéî straße"),  # accents
    ("I can't, won't, cannot, gonna, wanna go.", "i ca n't wo n't can not gon na wan na go"),
    ("don't DON'T isn't aren't", "do n't do n't is n't are n't"),
    ("i'm you're we've they'd she'll I'd've", "i 'm you 're we 've they 'd she 'll i 'd 've"),
    ("the dogs' bones and the man's hat", "the dogs bones and the man 's hat"),  # plural possessive '
    ("'90s rock'n'roll o'clock 'Tis", "'90s rock 'n' roll o'clock 't is"),
    ("well-known 3-year-old a/b and/or x-ray t-shirt", "well-known 3-year-old a/b and/or x-ray t-shirt"),
    ("yes... no.. maybe.... a--b c - d", "yes no maybe a b c d"),  # ... -- - . stripped
    ("hello,world the cat.the dog", "hello world the cat.the dog"),
    ("a <green> thing at http://www.x.com/y or a.b@c.com", "a <green> thing at http://www.x.com/y or a.b@c.com"),
    ("he's 5'10\" tall; ok: fine! really?", "he 's 5 10 tall ok fine really"),
    ("AT&T and M&M's", "at&t and m&m 's"),
    ("Tab\tseparated   text\nnew line", "tab separated text new line"),
    ("", ""),
]


# follows salaniz/pycocoevalcap (commit ad63453):
#   tokenizer/ptbtokenizer.py L21-L22 (punctuation list) and L65-L66 (the strip)
@pytest.mark.parametrize("text,expected", CONSTRUCTS)
def test_ptb_construct(text, expected):
    assert ptb_tokenize(text) == (expected.split() if expected else [])


# follows salaniz/pycocoevalcap (commit ad63453):
#   tokenizer/ptbtokenizer.py L28-L30 (the jar's raw tokens, before the L65-L66 strip)
def test_raw_tokens_before_the_strip():
    assert ptb_tokens_raw('He said "hi" (twice)...') == ["he", "said", "``", "hi", "''", "-lrb-", "twice", "-rrb-",
                                                         "..."]


def _need_java():
    if shutil.which("java") is None:
        pytest.skip("java is not on the PATH: the Java PTBTokenizer / METEOR 1.5 cannot run "
                    "(apt-get install default-jre-headless)")
    pytest.importorskip("pycocoevalcap.meteor.meteor", reason="pycocoevalcap is not installed")


# follows salaniz/pycocoevalcap (commit ad63453):
#   tokenizer/ptbtokenizer.py L18 and L28-L30 (stanford-corenlp-3.4.1 -preserveLines -lowerCase)
def test_ptb_rules_match_the_java_tokenizer():
    _need_java()
    lines = [t for t, _ in CONSTRUCTS if t] + [
        "A close-up of a person's hand, holding a pen.", 'A "no parking" sign.', "It's 100% cotton!",
        "a phone's screen, with 3 apps: Mail, Maps & Photos", "It's a dog's bowl(blue)", "Mr.Smith's car"]
    assert [ptb_tokenize(x) for x in lines] == java_ptb_tokenize(lines)


REFS = {0: ["a small red circle in the top left", "a red circle."], 1: ["a large blue square (on the right)"],
        2: ['the "green" triangle, bottom-left'], 3: ["a white circle in the middle"]}
PREDS = {0: "a red circle at the top left", 1: "a big blue square on the right", 2: "", 3: "a circle"}


# follows salaniz/pycocoevalcap (commit ad63453):
#   tokenizer/ptbtokenizer.py L62-L67 (an empty line joins to '')
def test_empty_prediction_is_a_zero_length_caption():
    """pycocoevalcap scores an empty caption as '' (no tokens): our BLEU / ROUGE-L / CIDEr equal its scorers on
    those streams, and differ from scoring a placeholder token."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ours = caption_scores(PREDS, REFS, metrics=["BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"])
    gts = {i: [" ".join(ptb_tokenize(r)) for r in REFS[i]] for i in REFS}
    res = {i: [" ".join(ptb_tokenize(PREDS[i]))] for i in REFS}
    assert res[2] == [""]
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert ours["BLEU-1"] == pytest.approx(bleu[0]) and ours["BLEU-4"] == pytest.approx(bleu[3])
    assert ours["ROUGE-L"] == pytest.approx(Rouge().compute_score(gts, res)[0])
    assert ours["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0])
    placeholder = {**res, 2: ["<empty>"]}
    assert Bleu(4).compute_score(gts, placeholder, verbose=0)[0][0] != pytest.approx(bleu[0])  # the old way


# follows salaniz/pycocoevalcap (commit ad63453):
#   meteor/meteor.py L12 and L18-L19 (meteor-1.5.jar and its arguments)
def test_meteor_through_java_equals_pycocoevalcaps_pipeline():
    """METEOR 1.5 (Java) on our Python PTB tokens == pycocoevalcap's own pipeline: its Java PTBTokenizer,
    then its Meteor scorer, on the same captions (an empty prediction included)."""
    _need_java()
    from maskloop.eval import caption_metrics

    ours = caption_scores(PREDS, REFS, metrics=["METEOR", "METEOR-nosyn"])
    ids = list(REFS)
    gts_java = java_ptb_tokenize([r for i in ids for r in REFS[i]])
    it = iter(gts_java)
    gts = {k: [" ".join(next(it)) for _ in REFS[i]] for k, i in enumerate(ids)}
    res = {k: [" ".join(t)] for k, t in enumerate(java_ptb_tokenize([PREDS[i] for i in ids]))}
    caption_metrics.meteor_java({0: ["x"]}, {0: ["x"]})  # the scorer process: pycocoevalcap's Meteor class
    ref_score, per = caption_metrics._METEOR.compute_score(gts, res)
    assert ours["METEOR"] == pytest.approx(float(ref_score), abs=1e-9)
    assert float(per[2]) == 0.0  # the empty prediction
    print(f"METEOR 1.5 {ours['METEOR']:.4f}  METEOR-nosyn {ours['METEOR-nosyn']:.4f}")
    assert ours["METEOR-nosyn"] > ours["METEOR"]  # the Java-free score reads higher (benchmarks/meteor_offset.py)
