"""Chat template, prompt builders and special tokens (docs/architecture.md).

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

# --- chat templates ---------------------------------------------------------------------------
# The entries of Sa2VA's PROMPT_TEMPLATE that its published checkpoints name in config.json ``template``
# (Sa2VA-4B: phi3_chat; Sa2VA-1B and the InternVL3 / Qwen2.5-VL / Qwen3-VL successors: qwen_chat;
# Sa2VA-8B / 26B: internlm2_chat).  A prompt is ``instruction`` with the user turn in ``{input}``; the
# answer is followed by ``suffix`` (Sa2VA: SUFFIX, which serves as the end of sequence); generation stops
# at any of ``stop_words``.  Sa2VA's prompts carry no system turn (neither its datasets nor its
# predict_forward add one), so ``system`` is listed for completeness and not emitted.
USER, END, ASSISTANT = "<|user|>", "<|end|>", "<|assistant|>"
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


@dataclass(frozen=True)
class ChatTemplate:
    system: str  # with "{system}"
    instruction: str  # with "{input}"
    suffix: str  # after every answer
    stop_words: tuple[str, ...]

    @property
    def user_prefix(self) -> str:
        return self.instruction.split("{input}")[0]

    @property
    def user_suffix(self) -> str:
        return self.instruction.split("{input}")[1]


_IM_INSTRUCTION = f"{IM_START}user\n{{input}}{IM_END}\n{IM_START}assistant\n"
TEMPLATES: dict[str, ChatTemplate] = {
    "phi3_chat": ChatTemplate(f"<|system|>\n{{system}}{END}\n", f"{USER}\n{{input}}{END}\n{ASSISTANT}\n", END, (END,)),
    "qwen_chat": ChatTemplate(f"{IM_START}system\n{{system}}{IM_END}\n", _IM_INSTRUCTION, IM_END, (IM_END, ENDOFTEXT)),
    "internlm2_chat": ChatTemplate(f"{IM_START}system\n{{system}}{IM_END}\n", _IM_INSTRUCTION, IM_END, (IM_END,)),
}
TEMPLATE_ALIASES = {"phi3": "phi3_chat"}  # maskloop's earlier name


def template_name(name: str | None) -> str:
    """The table key for ``name`` (Sa2VA writes ``-`` or ``_``: it replaces ``-`` by ``_``); unknown -> error."""
    from maskloop.config import ConfigError

    key = (name or "").replace("-", "_")
    key = TEMPLATE_ALIASES.get(key, key)
    if key not in TEMPLATES:
        raise ConfigError(f"unknown chat template {name!r}; supported: {sorted(TEMPLATES)}")
    return key


def get_template(name: str | None) -> ChatTemplate:
    return TEMPLATES[template_name(name)]

REGION_CAPTION_QUESTION = (
    "There are 1 part regions in the picture: region1{region}.\n"
    "Please generate a detailed description for the given image region."
)
# N regions (Sa2VA's predict_forward / Osprey data): "There are N part regions in the picture: "
# region1<vp>..</vp>, region2<vp>..</vp>, ... regionN<vp>..</vp>.\n  — the pieces around each region's cells:
REGIONS_OPEN = "There are {n} part regions in the picture: region1"  # + <vp>
REGION_NEXT = ", region{i}"  # </vp> + this + <vp>, before region i (i >= 2)

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


def _leading_special(tokenizer) -> list[int]:
    """The ids ``tokenizer.encode`` puts before the text by default (a BOS), [] if none."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_sp = tokenizer.encode("a", add_special_tokens=True)
    without = tokenizer.encode("a", add_special_tokens=False)
    return [bos] if with_sp[:1] == [bos] and without[:1] != [bos] else []


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
    """``token_id`` repeated lengths[b] times in row b (image / region context tokens).

    ``width``: a host-side bound on ``lengths.max()`` for lengths held on an accelerator (assembly then needs
    no host synchronisation to size the batch); None: read it from the lengths."""

    token_id: int
    lengths: torch.Tensor | int
    width: int | None = None


@dataclass
class Embeds:
    """Positions filled with given embeddings (B, T, D); row b uses its first lengths[b]."""

    embeds: torch.Tensor
    lengths: torch.Tensor


Part = Ragged | Fixed | Repeat | Embeds


class PromptBuilder:
    """Tokenises the fixed pieces once; builds the parts of every prompt kind."""

    def __init__(self, tokenizer, num_image_tokens: int, template: str = "phi3", seg_answer: str = "fixed"):
        t = get_template(template)
        if seg_answer not in SEG_ANSWER_STYLES:
            raise ValueError(f"unknown seg_answer {seg_answer!r}; known: {SEG_ANSWER_STYLES}")
        self.seg_answer = seg_answer
        self.tok = tokenizer
        self.n_img = num_image_tokens
        self.template = t
        ids = self.ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.img_ctx_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        self.seg_id = tokenizer.convert_tokens_to_ids(SEG)
        # generation stops at any stop word; a stop word the tokenizer splits (phi3_chat's <|end|> on a
        # Qwen2.5 tokenizer) is matched as a token sequence.  end_id: the suffix's last token.
        self.stop_seqs = [ids(w) for w in t.stop_words]
        self.stop_ids = sorted({q[0] for q in self.stop_seqs if len(q) == 1})
        self.end_id = ids(t.suffix)[-1]
        self.answer_end_ids = ids(t.suffix)  # every token of the answer suffix (with_end appends them all)
        # the tokenizer's BOS when its encode() adds one (InternLM2's <s>; Qwen2's adds none): Sa2VA's
        # predict_forward encodes with special tokens, its training (xtuner) prepends the same BOS
        self.bos = _leading_special(tokenizer)
        t = {"prefix": t.user_prefix, "suffix": t.user_suffix, "answer_end": t.suffix}
        self._user = self.bos + ids(t["prefix"] + IMG_START)
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
    def image_parts(self, n_image: torch.Tensor | None = None) -> list[Part]:
        """``<img>`` + image context tokens + ``</img>\\n``; ``n_image`` (B,) per-row token counts (tiles:
        n_tiles * 256), one tile's worth by default."""
        n = self.n_img if n_image is None else n_image
        return [Fixed(self._user), Repeat(self.img_ctx_id, n), Fixed(self._after_img)]

    # -- region caption: image + region(mask) -> caption
    def caption_parts(self, region_k: torch.Tensor, answer: Part | None = None, n_image: torch.Tensor | None = None,
                      n_regions: torch.Tensor | None = None, region_width: int | None = None) -> list[Part]:
        """``region_k`` (B,) number of region tokens of one region a row, or (B, R) of R region slots
        (row b uses its first ``n_regions[b]``, all R by default); ``answer`` teacher-forced caption
        (target); ``n_image`` see :meth:`image_parts`; ``region_width`` a host bound on ``region_k.max()``
        (one region a row; :class:`Repeat`)."""
        if region_k.dim() == 1:
            regions = [Fixed(self._cap_before_region), Repeat(self.img_ctx_id, region_k, region_width)]
        else:
            regions = self.region_list_parts(region_k, n_regions)
        parts = self.image_parts(n_image) + regions + [Fixed(self._cap_after_region)]
        return parts + ([answer] if answer is not None else [])

    def region_list_parts(self, region_k: torch.Tensor, n_regions: torch.Tensor | None = None) -> list[Part]:
        """Sa2VA's N-region list up to the last region's cells: ``There are N part regions in the picture:
        region1<vp>{K1 x IMG_CONTEXT}</vp>, region2<vp>...`` (the closing ``</vp>.\\n`` follows).

        region_k (B, R) cells per region slot; n_regions (B,) >= 1 regions used per row (default R)."""
        B, R = region_k.shape
        n_reg = torch.full((B,), R, dtype=torch.long) if n_regions is None else n_regions.long().cpu()
        if R == 0 or bool((n_reg < 1).any()) or bool((n_reg > R).any()):
            raise ValueError(f"each row needs 1..{R} regions, got {n_reg.tolist()}")
        cache = self.__dict__.setdefault("_region_ids", {})

        def piece(key, text):
            if key not in cache:
                cache[key] = self.ids(text)
            return cache[key]

        counts = n_reg.tolist()
        used = torch.arange(R)[None] < n_reg[:, None]  # (B, R)
        k = region_k * used.to(region_k.device)
        parts: list[Part] = [
            Ragged.from_lists([piece(("open", n), REGIONS_OPEN.format(n=n) + VP_START) for n in counts], self.pad_id),
            Repeat(self.img_ctx_id, k[:, 0]),
        ]
        for i in range(1, R):
            nxt = piece(("next", i + 1), VP_END + REGION_NEXT.format(i=i + 1) + VP_START)
            parts += [Ragged.from_lists([nxt if i < n else [] for n in counts], self.pad_id), Repeat(self.img_ctx_id, k[:, i])]
        return parts

    def caption_answer(self, captions: list[str]) -> Ragged:
        """The caption + the template's answer suffix, tokenised together as Sa2VA's training does."""
        return Ragged.from_lists([self.ids(c + self._answer_end) for c in captions], self.pad_id, target=True)

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
                  n_image: torch.Tensor | None = None, drop_article: bool = True):
        """Image + question around ``expr`` (+ the answer).  A question whose text before ``{expr}`` ends
        in "the" drops it for a token expression that starts with an article (``drop_article``).  With ``seg_answer="phrase"`` the answer is
        :data:`PHRASE_SEG_ANSWER` with ``expr`` repeated inside it (token ids: LM targets; embeddings: not),
        and the answer ids in ``questions`` are not used.  An answer may hold any number of [SEG]."""
        prefixes = [q[0] for q in questions]
        if drop_article and isinstance(expr, Ragged) and self._article_free:
            first = expr.ids[:, 0].tolist()
            prefixes = [self._article_free.get(tuple(p), p) if n > 1 and f in self._article_ids else p
                        for p, f, n in zip(prefixes, first, expr.lengths.tolist())]
        pre = Ragged.from_lists(prefixes, self.pad_id)
        suf = Ragged.from_lists([q[1] for q in questions], self.pad_id)
        parts = self.image_parts(n_image) + [pre, expr, suf]
        if not with_answer:
            return parts
        if self.seg_answer == "phrase":
            copy = Ragged(expr.ids, expr.lengths, target=True) if isinstance(expr, Ragged) else expr
            before, after = self._phrase_answer
            return parts + [Fixed(before, target=True), copy, Fixed(after, target=True)]
        return parts + [Ragged.from_lists([q[2] for q in questions], self.pad_id, target=True)]

    # -- a free instruction after the image (generation: the answer is the model's)
    def question_parts(self, questions: list[str], answer: Part | None = None,
                       n_image: torch.Tensor | None = None) -> list[Part]:
        """Image + ``\\n{question}`` user turn (+ ``answer``), e.g. "Please segment the cat and the dog."."""
        q = Ragged.from_lists([self.ids(t) + self._suffix_ids for t in questions], self.pad_id)
        return self.image_parts(n_image) + [q] + ([answer] if answer is not None else [])

    def answers(self, texts: list[str]) -> Ragged:
        """Answer texts (any number of [SEG] each) + the end token, as LM targets."""
        return Ragged.from_lists([self.ids(t) + [self.end_id] for t in texts], self.pad_id, target=True)

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
        {"additional_special_tokens": [USER, END, ASSISTANT, *ALL_SPECIAL, IM_START, IM_END, ENDOFTEXT]},
        replace_extra_special_tokens=False,
    )
    return tok
