"""Syntax highlighting of instruction text with pygments, as compact token lists for the page's script.

The page renders a function's rows only when someone opens it, from inline
JSON; each token is ``[css class, text]`` with pygments' short class names
(``k``, ``nv``, ``mh``...) styled by ``css()``, and references are
``["ref", name, anchor]``. Instruction texts repeat a lot (``push rbp``,
``ret``), so lexing is cached per text.
"""

from __future__ import annotations

from functools import lru_cache

from pygments.formatters import HtmlFormatter
from pygments.lexers.asm import NasmLexer
from pygments.token import STANDARD_TYPES, Error

from .disasm import Segment

__all__ = ["css", "tokens"]

_LEXER = NasmLexer()


@lru_cache(maxsize=65536)
def _lex(text: str) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for token_type, value in _LEXER.get_tokens(text):
        if not value or value == "\n":
            continue
        value = value.rstrip("\n")
        while token_type not in STANDARD_TYPES:
            token_type = token_type.parent
        # a reference cut out of the text leaves fragments (", rax") the lexer flags as errors: not ours to show
        css_class = STANDARD_TYPES[token_type] if token_type is not Error else ""
        if out and out[-1][0] == css_class:
            out[-1] = (css_class, out[-1][1] + value)
        else:
            out.append((css_class, value))
    return tuple(out)


def tokens(segments: list[Segment], anchors: dict[str, str]) -> list[tuple[str, ...]]:
    """Highlighted tokens of one instruction; a reference links to its function when the page shows it."""
    if len(segments) == 1 and segments[0][1] is None:
        return _lex(segments[0][0])  # type: ignore[return-value]  # shared, never mutated
    out: list[tuple[str, ...]] = []
    for text, key in segments:
        if key is None:
            out.extend(_lex(text))
        else:
            anchor = anchors.get(key)
            out.append(("ref", text, anchor) if anchor else ("ref", text))
    return out


def css(scope: str = ".asm") -> str:
    return HtmlFormatter(style="default").get_style_defs(scope)
