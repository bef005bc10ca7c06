"""Chat template, prompt builders and special tokens (SPEC §1).

Prompts are built as a list of *parts* so that the variable pieces (the image tokens, the K region
tokens, a caption given as embeddings) can be laid out by batched tensor code in
:mod:`maskloop.model.sequence`.  Text is tokenised only at special-token boundaries, where every
tokenizer splits anyway, so the ids equal those of tokenising the expanded string in one go.

The one exception is the expression in a referring question: when it comes as embeddings (Loop 1 /
Loop 2) its T positions sit exactly where ``{expr}`` would be, between the question's prefix and
suffix tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from maskloop.config import SEG_ANSWER_STYLES

# --- special tokens ---------------------------------------------------------------------------
SEG = "[SEG]"
P_START, P_END = "<p>", "</p>"
VP_START, VP_END = "<vp>", "</vp>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
NEW_TOKENS = (SEG, P_START, P_END, VP_START, VP_END)  # added by Sa2VA on top of InternVL's
IMAGE_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT)  # InternVL's own
ALL_SPECIAL = IMAGE_TOKENS + NEW_TOKENS

# --- chat template "phi3" --------------------------------------------------------------------
USER, END, ASSISTANT = "<|user|>", "<|end|>", "<|assistant|>"
TEMPLATES = {
    "phi3": {"prefix": f"{USER}\n", "suffix": f"{END}\n{ASSISTANT}\n", "answer_end": END},
}

REGION_CAPTION_QUESTION = (
    "There are 1 part regions in the picture: region1{region}.\n"
    "Please generate a detailed description for the given image region."
)

SEG_QUESTIONS = (
    "Can you segment the {expr} in this image?",
    "Please segment {expr} in this image.",
    "What is {expr} in this image? Please respond with segmentation mask.",
    "What is {expr} in this image? Please output segmentation mask.",
    "Can you segment the {expr} in this image",
    "Please segment {expr} in this image",
    "What is {expr} in this image? Please respond with segmentation mask",
    "What is {expr} in this image? Please output segmentation mask",
)
ARTICLES = ("the", "The", "a", "A", "an", "An")  # an expression starting with one needs no "the" before it
SEG_ANSWERS = ("It is [SEG].", "Sure, [SEG].", "Sure, it is [SEG].", "Sure, the segmentation result is [SEG].", "[SEG].")
FIXED_SEG_ANSWER = "Sure, [SEG]."  # the answer used by the loops' LM term
# seg_answer="phrase": the answer repeats the expression in Sa2VA's phrase markup (as its grounded-caption
# answers do) right before [SEG]; the copy is LM-supervised when the expression is given as tokens.
PHRASE_SEG_ANSWER = "Sure, <p>{expr}</p> [SEG]."


def add_special_tokens(tokenizer) -> list[int]:
    """Add the image and grounding tokens (if missing); return the ids of :data:`NEW_TOKENS`."""
    missing = [t for t in ALL_SPECIAL if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return [tokenizer.convert_tokens_to_ids(t) for t in NEW_TOKENS]


# --- parts ------------------------------------------------------------------------------------


@dataclass
class Ragged:
    """Per-row token runs: ids (B, l) left-aligned, lengths (B,)."""

    ids: torch.Tensor
    lengths: torch.Tensor
    target: bool = False  # supervise these tokens with the LM loss

    @classmethod
    def from_lists(cls, rows: list[list[int]], pad_id: int, target: bool = False) -> Ragged:
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), max(width, 1)), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):  # collate time, on token lists: not the training hot path
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return cls(ids, torch.tensor([len(r) for r in rows], dtype=torch.long), target)


@dataclass
class Fixed:
    """The same token ids in every row."""

    ids: list[int]
    target: bool = False


@dataclass
class Repeat:
    """``token_id`` repeated lengths[b] times in row b (image / region context tokens)."""

    token_id: int
    lengths: torch.Tensor | int


@dataclass
class Embeds:
    """Positions filled with given embeddings (B, T, D); row b uses its first lengths[b]."""

    embeds: torch.Tensor
    lengths: torch.Tensor


Part = Ragged | Fixed | Repeat | Embeds


class PromptBuilder:
    """Tokenises the fixed pieces once; builds the parts of every prompt kind."""

    def __init__(self, tokenizer, num_image_tokens: int, template: str = "phi3", seg_answer: str = "fixed"):
        if template not in TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; known: {sorted(TEMPLATES)}")
        if seg_answer not in SEG_ANSWER_STYLES:
            raise ValueError(f"unknown seg_answer {seg_answer!r}; known: {SEG_ANSWER_STYLES}")
        self.seg_answer = seg_answer
        self.tok = tokenizer
        self.n_img = num_image_tokens
        t = TEMPLATES[template]
        ids = self.ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.img_ctx_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        self.seg_id = tokenizer.convert_tokens_to_ids(SEG)
        self.end_id = ids(t["answer_end"])[-1]
        self._user = ids(t["prefix"] + IMG_START)
        self._after_img = ids(IMG_END + "\n")
        q = REGION_CAPTION_QUESTION.split("{region}")
        self._cap_before_region = ids(q[0] + VP_START)
        self._cap_after_region = ids(VP_END + q[1] + t["suffix"])
        self._suffix = t["suffix"]
        self._answer_end = t["answer_end"]
        self._seg_q = [tuple(ids(s) for s in q.split("{expr}")) for q in SEG_QUESTIONS]
        # "Can you segment the {expr}" with an expression that starts with an article would read
        # "segment the the red circle": such a prefix loses its "the" (token-id expressions only;
        # an expression given as embeddings has no text to look at)
        self._article_free = {}
        for q in SEG_QUESTIONS:
            before = q.split("{expr}")[0]
            if before.rstrip().lower().endswith(" the"):
                self._article_free[tuple(ids(before))] = ids(before.rstrip()[: -len("the")])
        self._article_ids = set()
        for w in ARTICLES:
            first = ids(f"{w} red")[:1]
            if first and self.tok.decode(first).strip() == w:  # the article is a whole token of its own
                self._article_ids.add(first[0])
        self._suffix_ids = ids(t["suffix"])
        self._seg_answers = [ids(a + t["answer_end"]) for a in SEG_ANSWERS]
        self.fixed_seg_answer = ids(FIXED_SEG_ANSWER + t["answer_end"])
        before, after = PHRASE_SEG_ANSWER.split("{expr}")
        self._phrase_answer = (ids(before), ids(after + t["answer_end"]))
        self.special_ids = sorted(
            {tokenizer.convert_tokens_to_ids(s) for s in ALL_SPECIAL}
            | set(tokenizer.all_special_ids)
            | {self.end_id, self.pad_id}
        )

    def ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False) if text else []

    # -- pieces shared by all prompts
    def image_parts(self) -> list[Part]:
        return [Fixed(self._user), Repeat(self.img_ctx_id, self.n_img), Fixed(self._after_img)]

    # -- region caption: image + region(mask) -> caption
    def caption_parts(self, region_k: torch.Tensor, answer: Part | None = None) -> list[Part]:
        """``region_k`` (B,) number of region tokens; ``answer`` teacher-forced caption (target)."""
        parts = self.image_parts() + [
            Fixed(self._cap_before_region),
            Repeat(self.img_ctx_id, region_k),
            Fixed(self._cap_after_region),
        ]
        return parts + ([answer] if answer is not None else [])

    def caption_answer(self, captions: list[str]) -> Ragged:
        return Ragged.from_lists([self.ids(c) + [self.end_id] for c in captions], self.pad_id, target=True)

    # -- referring segmentation: image + expression -> "... [SEG]"
    def seg_question(self, n: int, rng: random.Random | None = None, fixed: bool = False):
        """Per-row (prefix ids, suffix ids, answer ids) drawn from the paraphrase pools."""
        rng = rng or random.Random(0)
        rows = []
        for _ in range(n):
            pre, suf = self._seg_q[0] if fixed else rng.choice(self._seg_q)
            ans = self.fixed_seg_answer if fixed else rng.choice(self._seg_answers)
            rows.append((pre, suf + self._suffix_ids, ans))
        return rows

    def seg_parts(self, expr: Part, questions: list[tuple[list[int], list[int], list[int]]], with_answer=True,
                  drop_article: bool = True):
        """Image + question around ``expr`` (+ the answer).  A question whose text before ``{expr}`` ends
        in "the" drops it for a token expression that starts with an article (``drop_article``).  With ``seg_answer="phrase"`` the answer is
        :data:`PHRASE_SEG_ANSWER` with ``expr`` repeated inside it (token ids: LM targets; embeddings: not),
        and the answer ids in ``questions`` are not used."""
        prefixes = [q[0] for q in questions]
        if drop_article and isinstance(expr, Ragged) and self._article_free:
            first = expr.ids[:, 0].tolist()
            prefixes = [self._article_free.get(tuple(p), p) if n > 1 and f in self._article_ids else p
                        for p, f, n in zip(prefixes, first, expr.lengths.tolist())]
        pre = Ragged.from_lists(prefixes, self.pad_id)
        suf = Ragged.from_lists([q[1] for q in questions], self.pad_id)
        parts = self.image_parts() + [pre, expr, suf]
        if not with_answer:
            return parts
        if self.seg_answer == "phrase":
            copy = Ragged(expr.ids, expr.lengths, target=True) if isinstance(expr, Ragged) else expr
            before, after = self._phrase_answer
            return parts + [Fixed(before, target=True), copy, Fixed(after, target=True)]
        return parts + [Ragged.from_lists([q[2] for q in questions], self.pad_id, target=True)]

    def expressions(self, texts: list[str]) -> Ragged:
        return Ragged.from_lists([self.ids(t) for t in texts], self.pad_id)

    def decode(self, ids: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        return [self.tok.decode(row[: int(n)].tolist(), skip_special_tokens=True).strip() for row, n in zip(ids, lengths)]


# --- a small tokenizer for tests and the demo -------------------------------------------------


def build_word_tokenizer(words: list[str] | None = None):
    """A word-level ``PreTrainedTokenizerFast`` with the chat markers and special tokens.

    Built locally with ``tokenizers`` (nothing downloaded).  Words are lower-cased alphanumeric runs;
    punctuation and newlines are tokens of their own.  Unknown words map to ``<unk>``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = ["<pad>", "<unk>", "\n", ".", ",", "?", "!", "'", ":", "-", "region1", "1", "2", "3"]
    template_words = " ".join(SEG_QUESTIONS + SEG_ANSWERS + (REGION_CAPTION_QUESTION,))
    for ch in "{}.?,:[]":
        template_words = template_words.replace(ch, " ")
    vocab_words = base + sorted(set(template_words.lower().split()) | {w.lower() for w in (words or [])})
    vocab = {}
    for w in vocab_words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),  # spaces and tabs, not newlines
            pre_tokenizers.Split(Regex(r"\n|[^a-z0-9_]"), behavior="isolated"),  # newline, punctuation
        ]
    )
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>")
    tok.add_special_tokens(
        {"additional_special_tokens": [USER, END, ASSISTANT, *ALL_SPECIAL]}, replace_extra_special_tokens=False
    )
    return tok
