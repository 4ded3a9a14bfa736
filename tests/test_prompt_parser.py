"""The emphasis parser: golden cases of the web UI's syntax, and sdrt's literal unbalanced brackets."""
from __future__ import annotations

import warnings

import pytest

from sdrt.engine.prompt_parser import BREAK, parse

W = 1.1


def approx(items):
    return [x if x is BREAK else (x[0], pytest.approx(x[1], rel=1e-12)) for x in items]


@pytest.mark.parametrize("prompt,expected", [
    ("normal text", [("normal text", 1.0)]),
    ("", [("", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", W), (" word", 1.0)]),
    ("a [quiet] word", [("a ", 1.0), ("quiet", 1 / W), (" word", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", W)]),
    ("((very)) [[faint]]", [("very", W * W), (" ", 1.0), ("faint", 1 / W / W)]),
    ("(a fox:1.3)", [("a fox", 1.3)]),
    ("( fox : 0.5 )", [(" fox ", 0.5)]),
    ("(fox:-1)", [("fox", -1.0)]),
    ("((fox:1.5))", [("fox", 1.5 * W)]),
    ("[(fox:2)]", [("fox", 2 / W)]),
    # the web UI's own example with its "(" closed: nesting multiplies, runs of one weight merge
    ("a ((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * W), (" ", 1.0), ("on", 1 / W), (" a ", 1.0), ("hill", 0.5),
      (", sun, ", 1.0), ("sky", W ** 3), (".", 1.0)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    (r"a \\ b", [("a \\ b", 1.0)]),
    (r"smile \(happy\) (face)", [("smile (happy) ", 1.0), ("face", W)]),
    ("a: b", [("a: b", 1.0)]),
    ("(word:1.0)", [("word", 1.0)]),
    ("a (word:1.0) b", [("a word b", 1.0)]),          # merged: tokenizes as the plain prompt
    ("(a [b) c]", [("a ", W), ("b", 1.0), (" c", 1 / W)]),   # round and square pair independently
])
def test_golden(prompt, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # balanced prompts never warn
        assert parse(prompt) == approx(expected)


@pytest.mark.parametrize("prompt,expected", [
    ("a cat BREAK a dog", [("a cat", 1.0), BREAK, ("a dog", 1.0)]),
    ("BREAK a", [BREAK, ("a", 1.0)]),
    ("(a BREAK b)", [("a", W), BREAK, ("b", W)]),
    ("BREAKING news, break", [("BREAKING news, break", 1.0)]),     # only the whole upper-case word
])
def test_break(prompt, expected):
    assert parse(prompt) == approx(expected)


@pytest.mark.parametrize("prompt,expected,n", [
    ("(unbalanced", [("(unbalanced", 1.0)], 1),
    ("a (((house:1.3)) on", [("a (", 1.0), ("house", 1.3 * W), (" on", 1.0)], 1),
    ("oops) and ]", [("oops) and ]", 1.0)], 2),
    ("a :1.2) b", [("a :1.2) b", 1.0)], 1),
    ("[x (y]", [("x (y", 1 / W)], 1),
    ("(x:1.2.3)", [("x:1.2.3", W)], 0),   # not a number: the weight is text, the ")" closes
])
def test_unbalanced_brackets_are_literal_with_one_warning(prompt, expected, n):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert parse(prompt) == approx(expected)
    assert len(caught) == (1 if n else 0), [str(w.message) for w in caught]
    if n:
        message = str(caught[0].message)
        assert f"{n} bracket(s)" in message and "\n" not in message
