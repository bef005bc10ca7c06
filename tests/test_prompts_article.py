"""Referring questions never double the article: "Can you segment the the red circle" -> "... the red circle"."""

import re

import pytest
from conftest import make_tiny

from maskloop.model.prompts import SEG_QUESTIONS
from maskloop.model.sequence import assemble

EXPRS = ["the red circle", "a small square", "red circle", "left of the square", "the"]  # "the" alone: kept


def _reference(question: str, expr: str) -> str:
    """The question as a person writes it: no "the" before an expression that has its own article."""
    before, after = question.split("{expr}")
    if expr.split()[0].lower() in ("the", "a", "an") and len(expr.split()) > 1 and before.rstrip().endswith(" the"):
        before = before.rstrip()[: -len("the")]
    return _norm(before + expr + after)


def _norm(text: str) -> str:  # the word tokenizer lower-cases and splits off punctuation
    return " ".join(re.sub(r"([?.,])", r" \1 ", text.lower()).split())


@pytest.fixture(scope="module")
def model():
    return make_tiny()


@pytest.mark.parametrize("q", range(len(SEG_QUESTIONS)))
def test_every_question_reads_as_written(model, q):
    bld, tok = model.builder, model.tokenizer
    expr = bld.expressions(EXPRS)
    qs = [bld._seg_q[q] + (bld._seg_answers[0],)] * len(EXPRS)
    qs = [(pre, suf + bld._suffix_ids, ans) for pre, suf, ans in qs]
    asm = assemble(bld.seg_parts(expr, qs, with_answer=False), len(EXPRS), bld.pad_id)
    for row, mask, e in zip(asm.input_ids, asm.attention_mask, EXPRS):
        text = _norm(tok.decode(row[mask.bool()].tolist()))
        assert _reference(SEG_QUESTIONS[q], e) in text, (text, e)
        assert "the the red" not in text and "the a small" not in text
    # the research behaviour stays available
    raw = assemble(bld.seg_parts(expr, qs, with_answer=False, drop_article=False), len(EXPRS), bld.pad_id)
    first = _norm(tok.decode(raw.input_ids[0][raw.attention_mask[0].bool()].tolist()))
    if SEG_QUESTIONS[q].startswith("Can you segment the"):
        assert "segment the the red circle" in first
