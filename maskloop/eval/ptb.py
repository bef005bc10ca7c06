"""The COCO-caption tokenizer in Python: Stanford PTBTokenizer's rules + pycocoevalcap's punctuation strip.

pycocoevalcap tokenizes every caption with Stanford CoreNLP 3.4.1's ``PTBTokenizer``
(``-preserveLines -lowerCase``, one caption a line) and then drops the tokens of its
``PUNCTUATIONS`` list, compared case-sensitively with the *lower-cased* output.  This module
reproduces that on the constructs captions contain (each one is tested against the tokenizer's
documented output, and against the Java tokenizer itself when ``java`` is on the PATH):

=============================  =============================================================
construct                      PTB output (before the punctuation strip)
=============================  =============================================================
double quotes ``"a"``          opening ````` `` ````` / closing ``''`` (both stripped later)
single quotes ``'a'``          ````` `` and ``'`` (stripped); ``'90s`` stays one token
brackets ``( ) [ ] { }``       ``-lrb- -rrb- -lsb- -rsb- -lcb- -rcb-``; after lower-casing they
                               are *not* in the strip list (it holds ``-LRB-``), so they stay
clitics                        ``man's`` -> ``man 's``; ``don't`` -> ``do n't``; ``can't`` ->
                               ``ca n't``; ``'re 've 'd 'll 'm`` split off; ``dogs'`` -> ``dogs '``
split words                    ``cannot`` -> ``can not``, ``gonna`` -> ``gon na``, ``wanna``,
                               ``gotta``, ``lemme``, ``gimme``; ``rock'n'roll`` -> ``rock 'n' roll``
abbreviations                  ``mr. dr. st. etc. inc. jan. vs.`` (PTB's lists), acronyms
                               ``u.s. e.g. a.m. u.s.a.`` and single letters ``j.`` keep their
                               period; ``no.`` before a number; any other final period splits off
words with inner marks         ``well-known 3-year-old a/b and/or o'clock x.y.z`` one token
numbers                        ``10,000 3.5 1/2 3:30 -5 +3 1,000.50`` one token; ``½`` -> ``1/2``;
                               ``50%`` -> ``50 %``; ``$5`` -> ``$ 5``; ``#1`` -> ``# 1``
symbols                        ``& @home c++ <tag>`` kept; ``* = +`` split off; ``...`` and
                               ``--`` one token each (stripped later); ``..`` -> ``. .``
urls / e-mail                  ``http://www.x.com/y``, ``a.b@c.com`` one token
letters                        Unicode letters stay inside words (``café``, ``naïve``,
                               ``straße``); everything is lower-cased
=============================  =============================================================

    ptb_tokenize('A man\\'s dog (brown) doesn\\'t run...')
    # ['a', 'man', "'s", 'dog', '-lrb-', 'brown', '-rrb-', 'does', "n't", 'run']

An empty caption gives no tokens (pycocoevalcap scores it as a zero-length caption).
:func:`java_ptb_tokenize` runs the real Java tokenizer of an installed pycocoevalcap when
``java`` is on the PATH (used by the tests to check these rules).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

#: pycocoevalcap's ``PTBTokenizer.PUNCTUATIONS``: tokens removed after tokenizing (case-sensitive).
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_FRACTIONS = {"½": "1/2", "¼": "1/4", "¾": "3/4", "⅓": "1/3", "⅔": "2/3", "⅛": "1/8", "⅜": "3/8", "⅝": "5/8",
              "⅞": "7/8"}
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "wanna": ("wan", "na"), "gotta": ("got", "ta"),
                "lemme": ("lem", "me"), "gimme": ("gim", "me")}
# PTBLexer's abbreviation lists (months, days, states, titles, companies, name parts, misc.)
_ABBREV = frozenset(
    """jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri
    ala ariz ark calif colo conn ct dak del fla ga ill ind kan kans ky la mass md mich minn miss mo mont neb nev
    okla ore pa penn tenn tex va vt wash wis wisc wyo
    mr mrs ms drs dr prof profs sen sens rep reps atty attys lt col gen messrs gov govs adm rev maj sgt cpl pvt
    mt capt st ste ave pres lieut hon brig cmdr comdr pfc spc supt supts det m mm mme mmes mlle mlles
    inc co cos corp pty ptys pte ltd plc bancorp dept bhd assn univ intl sys tel est ext sq jr sr bros blvd rd esq
    etc al seq vs alex wm jos cie cf treas ft fig figs ca""".split()
)
_ACRONYM = re.compile(r"[^\W\d_](?:\.[^\W\d_])+")  # u.s, e.g, a.m (the final period is added)

_TOKEN = re.compile(
    r"""
    (?P<url>(?:https?://|www\.)[^\s"<>()\[\]{}]*[^\s"<>()\[\]{}.,;:!?'])
  | (?P<email>[\w.+\-]+@[\w\-]+(?:\.[\w\-]+)+)
  | (?P<tag></?[^\W\d_][^<>\s]*>)
  | (?P<ellipsis>\.\.\.+)
  | (?P<dashes>--+)
  | (?P<decade>'\d0s\b)
  | (?P<tis>'[Tt](?=(?:is|was)\b))
  | (?P<dquote>``|''|["“”„])
  | (?P<squote>[`'‘’])
  | (?P<number>(?:(?<![\w.])[+\-])?\d+(?:[,.:/]\d+)*(?![\w]|[\-/.]\w))
  | (?P<cpp>[^\W\d_]\+\+)
  | (?P<word>[\w@](?:[\w]|[&](?=\w)|['’](?=[^\W\d_])|[.\-/](?=\w))*)
  | (?P<other>\S)
    """,
    re.VERBOSE,
)
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'d|'ll|'m)$", re.IGNORECASE)


def _word_tokens(w: str) -> list[str]:
    """A word run -> PTB tokens (clitics, split words, 'n')."""
    w = w.replace("’", "'")
    low = w.lower()
    if low in _SPLIT_WORDS:
        a, b = _SPLIT_WORDS[low]
        return [w[: len(a)], w[len(a):]]
    if "'n'" in low:  # rock'n'roll
        i = low.index("'n'")
        return [t for t in (w[:i], w[i:i + 3], w[i + 3:]) if t]
    m = _CLITIC.match(w)
    if m and m.group(1) and not m.group(1).endswith("'"):
        return _word_tokens(m.group(1)) + [m.group(2)]  # I'd've -> I 'd 've
    return [w]


def _ptb_tokens_line(text: str) -> list[str]:
    """One caption -> PTB tokens (original case)."""
    for k, v in _FRACTIONS.items():
        text = text.replace(k, v)
    out: list[str] = []
    for chunk in text.split():
        pos = 0
        for m in _TOKEN.finditer(chunk):
            kind, t = m.lastgroup, m.group()
            start = m.start()
            at_start = start == 0 or chunk[start - 1] in "([{\"'`“‘"
            if kind == "dquote":
                out.append("``" if t in ("``", "“", "„") or (t == '"' and at_start and m.end() < len(chunk)) else "''")
            elif kind == "squote":
                out.append("`" if t in ("`", "‘") or (at_start and m.end() < len(chunk)) else "'")
            elif kind == "ellipsis":
                out.append("...")
            elif kind == "dashes":
                out.append("--")
            elif kind == "word":
                nxt = chunk[m.end():m.end() + 1]
                low = t.lower()
                keep_period = nxt == "." and chunk[m.end():m.end() + 2] != ".." and (
                    low in _ABBREV or _ACRONYM.fullmatch(low) is not None or (len(t) == 1 and t.isalpha()))
                if keep_period:
                    out.extend(_word_tokens(t)[:-1] + [_word_tokens(t)[-1] + "."])
                    pos = m.end() + 1
                    continue
                out.extend(_word_tokens(t))
            elif kind == "other":
                if start < pos:  # the period consumed by an abbreviation
                    continue
                out.append(_BRACKETS.get(t, t))
            else:
                out.append(t)
            pos = m.end()
    return _abbrev_no(out)


def _abbrev_no(tokens: list[str]) -> list[str]:
    """PTB keeps ``No.`` as one token before a number (``no. 5``)."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if (t.lower() == "no" and i + 2 < len(tokens) and tokens[i + 1] == "."
                and re.fullmatch(r"[+\-]?\d[\d,.:/]*", tokens[i + 2])):
            out.append(t + ".")
            i += 2
            continue
        out.append(t)
        i += 1
    return out


def ptb_tokenize(text: str) -> list[str]:
    """A caption -> the tokens pycocoevalcap scores: PTB tokens, lower-cased, punctuation removed."""
    return [t for t in (x.lower() for x in _ptb_tokens_line(text.replace("\n", " "))) if t not in PUNCTUATIONS]


def ptb_tokens_raw(text: str) -> list[str]:
    """The PTB tokens (lower-cased) before pycocoevalcap's punctuation strip."""
    return [x.lower() for x in _ptb_tokens_line(text.replace("\n", " "))]


# ------------------------------------------------------------------ the Java reference
def java_available() -> bool:
    return shutil.which("java") is not None


def _pycocoevalcap_dir() -> str | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec("pycocoevalcap")
    except ImportError:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def java_ptb_tokenize(lines: list[str], raw: bool = False) -> list[list[str]]:
    """Run pycocoevalcap's Stanford PTBTokenizer jar (``-preserveLines -lowerCase``) on ``lines``.

    ``raw``: the tokens before the punctuation strip.  Needs ``java`` and pycocoevalcap."""
    base = _pycocoevalcap_dir()
    jar = os.path.join(base or "", "tokenizer", "stanford-corenlp-3.4.1.jar")
    if not java_available() or base is None or not os.path.isfile(jar):
        raise RuntimeError("the Java PTBTokenizer needs `java` on the PATH and pycocoevalcap's "
                           "stanford-corenlp-3.4.1.jar (pip install pycocoevalcap; apt-get install default-jre-headless)")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write("\n".join(x.replace("\n", " ") for x in lines))
        path = f.name
    try:
        out = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                              "-lowerCase", path], capture_output=True, check=True).stdout.decode("utf-8")
    finally:
        os.unlink(path)
    rows = out.split("\n")[: len(lines)]
    rows += [""] * (len(lines) - len(rows))
    toks = [r.rstrip().split(" ") if r.strip() else [] for r in rows]
    return toks if raw else [[t for t in r if t not in PUNCTUATIONS] for r in toks]


__all__ = ["PUNCTUATIONS", "java_available", "java_ptb_tokenize", "ptb_tokenize", "ptb_tokens_raw"]
