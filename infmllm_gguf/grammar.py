"""Bounds on the grammars and JSON schemas a caller may hand to llama.cpp, checked in Python.

llama.cpp's GBNF parser recurses once per nested group, and the bundled JSON-schema converter
nests one group per optional repetition (`maxLength: 1000` becomes 1000 nested groups), so an
unchecked grammar or schema can exhaust the stack or the memory of the process.  These checks
refuse such input with a `GrammarError` (a `ValueError`) before any native call; the build's
grammar patch bounds the native recursion as well, as a second line.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "MAX_GRAMMAR_BYTES",
    "MAX_GRAMMAR_NESTING",
    "MAX_SCHEMA_REPETITION",
    "GrammarError",
    "check_grammar",
    "check_schema",
]

MAX_GRAMMAR_BYTES = 256 * 1024
MAX_GRAMMAR_NESTING = 1000  # groups open at once; the patched parser refuses beyond 1024
MAX_SCHEMA_REPETITION = 512  # each is one nested group (or one copy of the item) in the grammar
MAX_SCHEMA_DEPTH = 64  # objects and lists inside one another in a schema

# what the nesting count skips: comments, string literals and character classes (their
# parentheses are characters, not groups)
_GBNF_TOKENS = re.compile(r'#[^\r\n]*|"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|[()]', re.S)
_SCHEMA_BOUNDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_REGEX_COUNTS = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


class GrammarError(ValueError):
    """A grammar or JSON schema larger or deeper than the bounds above."""


def check_grammar(text: str) -> None:
    """Raise GrammarError unless text is a GBNF string within the size and nesting bounds."""
    if not isinstance(text, str):
        raise GrammarError(f"a grammar must be a GBNF string, got {type(text).__name__}")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"the grammar has {size} bytes; at most {MAX_GRAMMAR_BYTES} are accepted")
    depth = deepest = 0
    for match in _GBNF_TOKENS.finditer(text):
        token = match.group()
        if token == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif token == ")":
            depth = max(0, depth - 1)
    if deepest > MAX_GRAMMAR_NESTING:
        raise GrammarError(
            f"the grammar nests groups {deepest} deep; at most {MAX_GRAMMAR_NESTING} are accepted"
        )


def check_schema(schema: Any) -> None:
    """Raise GrammarError unless a JSON schema's repetition bounds (minLength ... maxProperties,
    and {m,n} counts in a pattern) are at most MAX_SCHEMA_REPETITION and its nesting at most
    MAX_SCHEMA_DEPTH: the converter writes out each repetition."""
    todo: list[tuple[Any, int]] = [(schema, 0)]
    while todo:
        node, depth = todo.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise GrammarError(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(node, list):
            todo.extend((item, depth + 1) for item in node)
            continue
        if not isinstance(node, dict):
            continue
        for key in _SCHEMA_BOUNDS:
            if key in node:
                _check_count(key, node[key])
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            for match in _REGEX_COUNTS.finditer(pattern):
                for count in match.groups():
                    if count:
                        _check_count("a {m,n} count in pattern", int(count))
        todo.extend((value, depth + 1) for value in node.values() if isinstance(value, (dict, list)))


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SCHEMA_REPETITION:
        raise GrammarError(
            f"JSON schema {name} must be an integer in [0, {MAX_SCHEMA_REPETITION}], got {value!r}"
        )
