"""A safe arithmetic parser for Countdown answers: never ``eval``.

Two grammars, one recursive-descent parser:

- ``strict`` (this project): integer literals, binary ``+ - * /``, unary ``+ -``, parentheses. Evaluated exactly with
  :class:`fractions.Fraction`, so ``(1/3)*3`` is exactly 1.
- ``python``: a subset of the expressions Python's ``eval`` accepts over d1's character class
  ``[0-9+\\-*/(). ]`` (int literals without leading zeros, float literals such as ``1.`` and ``.5``, ``**``, ``//``),
  evaluated with Python's own int/float operators, so the value equals what ``eval`` returns. A power whose result
  would exceed 100,000 bits is refused (``eval`` would hang or return a huge number; both score as "wrong" in d1).

Limits on every input, so a hostile completion costs microseconds and never raises anything but
:class:`ExpressionError`: at most ``MAX_CHARS`` characters, ``MAX_TOKENS`` tokens, ``MAX_DEPTH`` nested levels, and
literals of at most ``MAX_DIGITS`` digits. ``d1_compat`` does not use this module: d1 had no such limits, so it reads
answers with ``stp.tasks._d1.python_value`` (CPython's own parser, exact evaluation).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

__all__ = ["ExpressionError", "Expression", "parse", "evaluate", "MAX_CHARS", "MAX_TOKENS", "MAX_DEPTH", "MAX_DIGITS"]

MAX_CHARS = 512
MAX_TOKENS = 128
MAX_DEPTH = 32
MAX_DIGITS = 30
_MAX_POWER_BITS = 100_000

Grammar = Literal["strict", "python"]
Number = Fraction | int | float | complex


class ExpressionError(ValueError):
    """Not a valid expression under the grammar, over a size limit, or not evaluable (division by zero)."""


@dataclass(frozen=True)
class Expression:
    """A parsed expression: a nested tuple tree and the integer literals it uses, in order of appearance."""

    tree: tuple
    literals: tuple[Number, ...]


def _tokenize(text: str, grammar: Grammar) -> list[tuple[str, object]]:
    if len(text) > MAX_CHARS:
        raise ExpressionError(f"expression longer than {MAX_CHARS} characters")
    tokens: list[tuple[str, object]] = []
    i, n, parens = 0, len(text), 0
    while i < n:
        ch = text[i]
        if ch in "\n\r" and grammar == "python" and parens <= 0:
            raise ExpressionError("line break outside parentheses")  # ends the statement: a SyntaxError for eval
        if ch in " \t\n\r\f\v":
            i += 1
            continue
        if ch.isascii() and (ch.isdigit() or (ch == "." and grammar == "python")):
            j = i
            while j < n and text[j].isascii() and text[j].isdigit():
                j += 1
            is_float = False
            if grammar == "python" and j < n and text[j] == ".":
                is_float = True
                j += 1
                while j < n and text[j].isascii() and text[j].isdigit():
                    j += 1
            literal = text[i:j]
            if literal == ".":
                raise ExpressionError("lone '.'")
            if sum(c.isdigit() for c in literal) > MAX_DIGITS:
                raise ExpressionError(f"number literal longer than {MAX_DIGITS} digits")
            if is_float:
                value: object = float(literal)
            elif grammar == "python" and len(literal) > 1 and literal[0] == "0" and literal.strip("0"):
                raise ExpressionError(f"leading zeros in integer literal {literal!r}")  # a SyntaxError in Python 3
            elif grammar == "python":
                value = int(literal)
            else:
                value = Fraction(int(literal))
            tokens.append(("num", value))
            i = j
            continue
        if grammar == "python" and text.startswith(("**", "//"), i):
            tokens.append(("op", text[i : i + 2]))
            i += 2
            continue
        if ch in "+-*/()":
            parens += {"(": 1, ")": -1}.get(ch, 0)
            tokens.append(("op", ch))
            i += 1
            continue
        raise ExpressionError(f"unexpected character {ch!r}")
    if len(tokens) > MAX_TOKENS:
        raise ExpressionError(f"more than {MAX_TOKENS} tokens")
    return tokens


class _Parser:
    def __init__(self, tokens: list[tuple[str, object]], grammar: Grammar):
        self.tokens, self.pos, self.grammar, self.literals = tokens, 0, grammar, []

    def peek(self) -> object:
        return self.tokens[self.pos][1] if self.pos < len(self.tokens) and self.tokens[self.pos][0] == "op" else None

    def take(self) -> tuple[str, object]:
        if self.pos >= len(self.tokens):
            raise ExpressionError("unexpected end of expression")
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def expr(self, depth: int) -> tuple:
        node = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()[1]
            node = (op, node, self.term(depth))
        return node

    def term(self, depth: int) -> tuple:
        ops = ("*", "/", "//") if self.grammar == "python" else ("*", "/")
        node = self.unary(depth)
        while self.peek() in ops:
            op = self.take()[1]
            node = (op, node, self.unary(depth))
        return node

    def unary(self, depth: int) -> tuple:
        if depth > MAX_DEPTH:
            raise ExpressionError(f"nested deeper than {MAX_DEPTH} levels")
        if self.peek() in ("+", "-"):
            op = self.take()[1]
            return ("neg" if op == "-" else "pos", self.unary(depth + 1))
        return self.power(depth)

    def power(self, depth: int) -> tuple:
        base = self.atom(depth)
        if self.grammar == "python" and self.peek() == "**":
            self.take()
            return ("**", base, self.unary(depth + 1))  # right-associative; binds tighter than a unary on its left
        return base

    def atom(self, depth: int) -> tuple:
        kind, value = self.take()
        if kind == "num":
            self.literals.append(value)
            return ("num", value)
        if value == "(":
            if depth + 1 > MAX_DEPTH:
                raise ExpressionError(f"nested deeper than {MAX_DEPTH} levels")
            node = self.expr(depth + 1)
            if self.pos >= len(self.tokens) or self.take()[1] != ")":
                raise ExpressionError("unbalanced parentheses")
            return node
        raise ExpressionError(f"unexpected {value!r}")


def parse(text: str, grammar: Grammar = "strict") -> Expression:
    """Parse an arithmetic expression; :class:`ExpressionError` if it is not one.

    >>> parse("(44 + 19) + 35").literals
    (Fraction(44, 1), Fraction(19, 1), Fraction(35, 1))
    >>> parse("2**3", "python").tree
    ('**', ('num', 2), ('num', 3))
    >>> parse("2**3")
    Traceback (most recent call last):
    ...
    stp.tasks.arith.ExpressionError: unexpected '*'
    """
    tokens = _tokenize(text, grammar)
    if not tokens:
        raise ExpressionError("empty expression")
    parser = _Parser(tokens, grammar)
    tree = parser.expr(0)
    if parser.pos != len(tokens):
        raise ExpressionError(f"unexpected {tokens[parser.pos][1]!r} after a complete expression")
    return Expression(tree, tuple(parser.literals))


_PY_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "//": operator.floordiv}


def _python_power(base: Number, exponent: Number) -> Number:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if base.bit_length() * exponent > _MAX_POWER_BITS:
            raise ExpressionError("power too large")
    try:
        return base**exponent
    except (OverflowError, ZeroDivisionError) as exc:
        raise ExpressionError(str(exc)) from exc


def _eval(node: tuple, grammar: Grammar) -> Number:
    kind = node[0]
    if kind == "num":
        return node[1]
    if kind == "neg":
        return -_eval(node[1], grammar)
    if kind == "pos":
        return +_eval(node[1], grammar)
    left, right = _eval(node[1], grammar), _eval(node[2], grammar)
    if kind == "**":
        return _python_power(left, right)
    if grammar == "strict":
        if kind == "/":
            if right == 0:
                raise ExpressionError("division by zero")
            return left / right
        return _PY_OPS[kind](left, right)
    try:
        out = _PY_OPS[kind](left, right)
    except (ZeroDivisionError, OverflowError, TypeError) as exc:
        raise ExpressionError(str(exc)) from exc
    return out


def evaluate(expression: Expression | str, grammar: Grammar = "strict") -> Number:
    """The value of an expression: exact (Fraction) for ``strict``, Python's int/float for ``python``.

    >>> evaluate("(1/3)*3")
    Fraction(1, 1)
    >>> evaluate("7/2", "python"), evaluate("7//2", "python")
    (3.5, 3)
    >>> evaluate("1/(2-2)")
    Traceback (most recent call last):
    ...
    stp.tasks.arith.ExpressionError: division by zero
    """
    if isinstance(expression, str):
        expression = parse(expression, grammar)
    return _eval(expression.tree, grammar)
