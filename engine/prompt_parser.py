"""Emphasis syntax of the most used SD web UI (its prompt_parser.parse_prompt_attention):

    (word)       weight x 1.1             [word]       weight / 1.1
    (word:1.3)   weight x 1.3             ((word))     nesting multiplies: x 1.21
    \\( \\) \\[ \\]  literal brackets          \\\\           a literal backslash
    BREAK        ends the current 75-token chunk (pads it), the text after starts a new one

A prompt becomes [(text, weight), ...] with BREAK as its own marker. Where the web UI would apply
an unclosed "(" to the rest of the prompt, sdrt treats every unbalanced bracket (and a ":1.3)"
with no "(" before it) as literal text and warns once per prompt: never an error.
"""
from __future__ import annotations

import re
import warnings

ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = object()   # marker between segments: start a new chunk

LEXER = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|   # escapes (a lone backslash is dropped, as in the web UI)
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|      # ":1.3)" closes a "(" with an explicit weight
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
SPLIT_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def lex(text: str) -> list[tuple[str, str, float | None]]:
    """[(kind, text, weight)]: kind is "text", "(", "[", ")", "]" or ":w)" (weight set)."""
    out = []
    for m in LEXER.finditer(text):
        s, w = m.group(0), m.group(1)
        if s.startswith("\\"):
            out.append(("text", s[1:], None))
        elif s in ("(", "[", ")", "]"):
            out.append((s, s, None))
        elif w is not None:
            try:
                out.append((":w)", s, float(w)))
            except ValueError:   # ":1.2.3)": the weight is text, the ")" still closes
                out.append(("text", s[:-1].rstrip(), None))
                out.append((")", ")", None))
        else:
            out.append(("text", s, None))
    return out


def match_brackets(tokens: list) -> set[int]:
    """Indices of brackets without a partner (round and square pair independently, as in the
    web UI); these become literal text."""
    round_open, square_open, unmatched = [], [], set()
    for i, (kind, _, _) in enumerate(tokens):
        if kind == "(":
            round_open.append(i)
        elif kind == "[":
            square_open.append(i)
        elif kind in (")", ":w)"):
            (round_open.pop() if round_open else unmatched.add(i))
        elif kind == "]":
            (square_open.pop() if square_open else unmatched.add(i))
    return unmatched | set(round_open) | set(square_open)


def parse(text: str) -> list:
    """[(text, weight) or BREAK, ...]: adjacent runs of equal weight merged, at least one item."""
    tokens = lex(text)
    literal = match_brackets(tokens)
    if literal:
        warnings.warn(f"unbalanced brackets in prompt {shorten(text)!r}: {len(literal)} bracket(s) "
                      "taken as literal text (escape them as \\( \\) to silence this)", stacklevel=2)
    res, round_open, square_open = [], [], []

    def multiply_from(start: int, factor: float) -> None:
        for item in res[start:]:
            if item is not BREAK:
                item[1] *= factor

    for i, (kind, s, w) in enumerate(tokens):
        if kind == "text" or i in literal:
            for j, part in enumerate(SPLIT_BREAK.split(s) if kind == "text" else [s]):
                if j:
                    res.append(BREAK)
                res.append([part, 1.0])
        elif kind == "(":
            round_open.append(len(res))
        elif kind == "[":
            square_open.append(len(res))
        elif kind == ":w)":
            multiply_from(round_open.pop(), w)
        elif kind == ")":
            multiply_from(round_open.pop(), ROUND)
        elif kind == "]":
            multiply_from(square_open.pop(), SQUARE)
    return merge_runs(res) or [("", 1.0)]


def merge_runs(items: list) -> list:
    """Adjacent segments of equal weight joined (they then tokenize as one text); empty text
    dropped, BREAK markers kept."""
    out = []
    for item in items:
        if item is BREAK:
            out.append(BREAK)
        elif out and out[-1] is not BREAK and out[-1][1] == item[1]:
            out[-1] = (out[-1][0] + item[0], item[1])
        elif item[0] or not out:
            out.append((item[0], item[1]))
    return [x for x in out if x is BREAK or x[0] or len(out) == 1]


def shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."
