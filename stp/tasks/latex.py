"""MATH answers: the last ``\\boxed{}`` of a text and answer equivalence over the usual LaTeX spellings.

Equivalence is string equality after :func:`normalize`, then, if the strings differ, exact rational equality when both
sides are plain numbers (``0.5``, ``\\frac12``, ``1/2``, ``-\\dfrac{3}{4}``, ``1{,}000``). Every function is total: any
input, however malformed, gives a result (None / False), never an exception, in time linear in its length.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["last_boxed", "normalize", "to_number", "is_equiv", "MAX_ANSWER_CHARS"]

MAX_ANSWER_CHARS = 1000  # longer "answers" are never equivalent to anything


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at ``text[start] == "{"`` and the index after it; None if unbalanced."""
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "\\":  # an escaped brace \{ \} does not open or close a group
            continue
        if ch == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif ch == "}" and (i == 0 or text[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed 5``) in ``text``, brace-matched, unwrapped
    recursively (``\\boxed{\\boxed{5}}`` gives ``5``); None if there is none or its braces do not close.

    >>> last_boxed(r"so $\\boxed{\\frac{1}{2}}$. Check: \\boxed{\\left(1, 2\\right)}")
    '\\\\left(1, 2\\\\right)'
    >>> last_boxed(r"\\boxed{\\boxed{5}}"), last_boxed(r"\\boxed 7$"), last_boxed(r"\\boxed{5"), last_boxed("5")
    ('5', '7', None, None)
    """
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    # An inner \boxed found by rfind inside an outer one is the same answer, unwrapped.
    rest = text[idx + (6 if text.startswith("\\boxed", idx) else 5) :]
    stripped = rest.lstrip(" ")
    if stripped.startswith("{"):
        got = _braced(stripped, 0)
        if got is None:
            return None
        content = got[0].strip()
    elif rest.startswith(" ") and stripped:
        content = re.split(r"[\s$]", stripped, maxsplit=1)[0]
    else:
        return None
    inner = last_boxed(content) if ("\\boxed" in content or "\\fbox" in content) else None
    return inner if inner is not None else content


_UNIT_CMD = re.compile(r"\\(?:text|textbf|mbox|mathrm)\s*\{")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_INT = re.compile(r"[-+]?\d+")


def _strip_unit_commands(s: str) -> str:
    """Unwrap ``\\text{X}`` when it is the whole answer; drop it (and a following ``^2``) when it follows a value."""
    out, i = [], 0
    while True:
        m = _UNIT_CMD.search(s, i)
        if m is None:
            out.append(s[i:])
            break
        got = _braced(s, m.end() - 1)
        if got is None:  # unbalanced: leave the rest as it is
            out.append(s[i:])
            break
        content, end = got
        before = "".join(out) + s[i : m.start()]
        if before.strip():
            unit_power = re.match(r"\^\{?\d\}?", s[end:])
            if unit_power:
                end += unit_power.end()
            out.append(s[i : m.start()])  # a unit after a value: drop it
        else:
            out.append(s[i : m.start()] + content)  # the whole answer is text: keep its content
        i = end
    return "".join(out)


def _fix_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{72}`` -> ``\\frac{1}{72}``, ``\\frac{3}4`` -> ``\\frac{3}{4}``."""

    def group(t: str, j: int) -> tuple[str, int] | None:
        while j < len(t) and t[j] == " ":
            j += 1
        if j >= len(t):
            return None
        if t[j] == "{":
            got = _braced(t, j)
            return None if got is None else ("{" + got[0] + "}", got[1])
        if t[j] == "\\":
            return None
        return "{" + t[j] + "}", j + 1

    out, i = [], 0
    while True:
        k = s.find("\\frac", i)
        if k < 0:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i : k + 5])
        num = group(s, k + 5)
        den = group(s, num[1]) if num else None
        if num is None or den is None:
            out.append(s[k + 5 :])
            return "".join(out)
        out.append(num[0] + den[0])
        i = den[1]


_ROW = "\ue000"  # a private-use character standing for a matrix row break while the string is normalised
_ENV_OR_ROW = re.compile(r"\\begin\{[^{}]*\}|\\end\{[^{}]*\}|\\\\")


def _backslashes(s: str) -> str:
    """Doubled backslashes. Inside an environment (``pmatrix``, ``array``, ``cases``...), ``\\\\`` is a row break,
    kept as one token whatever the spaces around it; elsewhere ``\\\\`` reads as ``\\`` (as d1 reads it
    everywhere), so an escaped ``\\\\frac{1}{2}`` is ``\\frac{1}{2}``.
    """
    s = s.replace(_ROW, "").replace("\\\\begin{", "\\begin{").replace("\\\\end{", "\\end{")
    if "\\begin{" not in s:
        return s.replace("\\\\", "\\")
    out, depth, i = [], 0, 0
    for m in _ENV_OR_ROW.finditer(s):
        out.append(s[i : m.start()])
        token = m.group()
        if token == "\\\\":
            out.append(_ROW if depth > 0 else "\\")
        else:
            depth = depth + 1 if token.startswith("\\begin") else max(0, depth - 1)
            out.append(token)
        i = m.end()
    out.append(s[i:])
    return "".join(out)


def normalize(answer: str) -> str:
    """A canonical spelling of a MATH answer.

    >>> normalize(r"\\dfrac{3}{4}"), normalize(r"\\left( 1, 2 \\right)"), normalize(r"10\\text{ cm}^2")
    ('\\\\frac{3}{4}', '(1,2)', '10')
    >>> normalize(r"90^\\circ"), normalize(r"x = 5."), normalize(r"\\$1{,}000"), normalize(r"\\text{(C)}")
    ('90', '5', '1000', '(C)')
    >>> normalize(r"\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}") == normalize(r"\\begin{pmatrix}1\\\\2\\end{pmatrix}")
    True
    >>> normalize(r"\\\\frac{1}{2}")
    '\\\\frac{1}{2}'
    """
    s = _backslashes(answer.strip())
    s = s.replace("\n", "").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\:", "")
    s = s.replace("\\ ", " ").replace("~", " ").replace("\\displaystyle", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\circ", "").replace("°", "").replace("\\degree", "")
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "").replace("%", "")
    s = _strip_unit_commands(s)
    s = s.replace("{,}", ",")
    s = s.replace(" ", "")
    if s.count("=") == 1 and len(s.split("=")[0]) <= 2:  # "x=5", "k=3"
        s = s.split("=")[1]
    s = s.rstrip(".")
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = _fix_fracs(s)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if s.startswith("."):
        s = "0" + s
    return s.replace(_ROW, "\\\\")


def to_number(s: str) -> Fraction | None:
    """The exact value of a normalised plain number (int, decimal, ``\\frac{a}{b}``, ``a/b``, with sign); else None.

    >>> to_number("0.5") == to_number(r"\\frac{1}{2}") == to_number("1/2") == Fraction(1, 2)
    True
    >>> to_number(r"-\\frac{3}{4}"), to_number(r"\\frac{-3}{4}"), to_number("x"), to_number("9e999")
    (Fraction(-3, 4), Fraction(-3, 4), None, None)
    """
    if len(s) > 64:
        return None
    sign = 1
    if s[:1] in "+-" and s[1:].startswith("\\frac"):
        sign, s = (-1 if s[0] == "-" else 1), s[1:]
    m = re.fullmatch(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", s) or re.fullmatch(r"([-+]?\d+)/([-+]?\d+)", s)
    if m:
        num, den = m.group(1), m.group(2)
        if _DECIMAL.fullmatch(num) and _DECIMAL.fullmatch(den) and Fraction(den) != 0:
            return sign * Fraction(num) / Fraction(den)
        return None
    if _DECIMAL.fullmatch(s):
        return Fraction(s)
    return None


def is_equiv(prediction: str | None, reference: str | None) -> bool:
    """Whether two MATH answers are the same: normalised strings equal, or equal as exact numbers.

    >>> is_equiv(r"\\frac12", "0.5"), is_equiv(r"\\tfrac{1}{2}", r"\\dfrac12"), is_equiv("2.0", "2")
    (True, True, True)
    >>> is_equiv(r"\\left[ 2, 5 \\right)", "[2,5)"), is_equiv("0.33", r"\\frac13"), is_equiv(None, None)
    (True, False, False)
    """
    if prediction is None or reference is None:
        return False
    if len(prediction) > MAX_ANSWER_CHARS or len(reference) > MAX_ANSWER_CHARS:
        return False
    a, b = normalize(prediction), normalize(reference)
    if not a or not b:
        return False
    if a == b:
        return True
    x, y = to_number(a), to_number(b)
    return x is not None and y is not None and x == y
