"""A faithful re-implementation of d1's reward code path (``d1_compat=True``), bugs included, for reproducing numbers.

Reference: d1 (Zhao et al., 2025), ``diffu-grpo/reward_func.py``, ``diffu-grpo/math500_utils.py`` and
``diffu-grpo/data_utils.py`` as published with the paper (run there on Python 3.10). Function for function, each gives
the original's value on one completion, with these changes, none of which alters a reward:

- printing and random logging are dropped (rewards stay pure);
- d1's regular expressions (``re.findall(r"<answer>(.*?)</answer>", ...)``, the GSM8K soft and strict format
  patterns) are replaced by string scans that accept exactly the same texts in time linear in the completion's length
  (the regexes backtrack quadratically on inputs such as ``"<answer>" * k``);
- ``assert`` used as control flow in d1's MATH helpers becomes an explicit raise (same result, also under ``-O``);
- Countdown's ``eval(equation, {"__builtins__": None}, {})`` is replaced by :func:`python_value`: the text is
  compiled by the running CPython (``compile``, as ``eval`` does; never executed) and parsed with ``ast.parse``, so
  exactly the syntax ``eval`` accepts is accepted (vertical tab and other Unicode whitespace rejected, 200 nested
  parentheses at most, ...), and the tree is evaluated with Python's own int / float / complex operators. Integers
  beyond ``HUGE_BITS`` bits are not built: they are tracked by sign, parity and size, which decides every case d1 can
  meet with three numbers (``(2**200000)**0`` is 1, ``3/2**2**30`` is 0.0, ``2**3**20 * 0`` is 0, ``2**3**20 + 1`` is
  not the target). See :func:`python_value` for the few inputs where d1 itself never returns;
- a completion is a plain string (d1 unpacks ``completion[0]["content"]`` in a batch loop).

The reference answers are taken as d1's data loaders give them: GSM8K's ``text.split("####")[1].strip()`` of the raw
solution (thousands commas kept: d1 compares ``"1,080"``, not ``"1080"``), MATH's
``remove_boxed(last_boxed_only_string(solution))`` of the raw solution (:func:`gsm8k_reference`,
:func:`math_reference`).

The bugs kept on purpose, and fixed in the task modules (see docs/rewards.md):

1. MATH format: ``"\\boxed" in r`` is written without a raw string, so ``"\\b"`` is a backspace character and the test
   looks for ``"\\x08oxed"``: it is always False, and every completion gets the 0.5 "no box" credit.
2. GSM8K soft/strict format: ``re.match`` without ``re.DOTALL``, so ``.`` stops at a newline; any multi-line
   reasoning makes the soft check fail, and the strict check passes only for one-line reasoning and answer.
3. ``extract_xml_answer`` returns the whole completion when it has no ``<answer>`` tag, so a bare ``"18"`` earns
   correctness and integer rewards; MATH compares the whole completion when it has no ``\\boxed``.
4. ``count_xml`` penalises the *whole* completion (0.001 per character, unbounded) when it has ``"\\n<answer>\\n"``
   but not ``"\\n</answer>\\n"``, so long completions get large negative rewards.
"""

from __future__ import annotations

import ast
import operator
import re
import sys
import threading
import warnings
from dataclasses import dataclass

__all__ = ["HUGE_BITS", "python_value", "gsm8k_reference", "math_reference"]

# --------------------------------------------------------------------------------------------------- GSM8K (gist)


def gsm8k_reference(solution: str) -> str:
    """d1's ``extract_hash_answer``: the text after the first ``####``, stripped, thousands commas kept.

    >>> gsm8k_reference("2 + 2 = 1,078 + 2\\n#### 1,080")
    '1,080'
    """
    return solution.split("####")[1].strip()


def extract_xml_answer(text: str) -> str:
    """The text between the last ``<answer>`` and the next ``</answer>``; the whole text when tags are missing."""
    answer = text.split("<answer>")[-1]
    answer = answer.split("</answer>")[0]
    return answer.strip()


def correctness(text: str, answer: str) -> float:
    return 2.0 if extract_xml_answer(text) == answer else 0.0


def int_reward(text: str) -> float:
    return 0.5 if extract_xml_answer(text).isdigit() else 0.0


# d1's patterns, published without re.DOTALL (bug 2), and matched with re.match:
#   strict  r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$"
#   soft    r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>"
# Without DOTALL ``.`` is any character but "\n", so both reduce to the line scans below.
_STRICT_MID = "\n</reasoning>\n<answer>\n"
_STRICT_TAIL = "\n</answer>\n"


def strict_format(text: str) -> float:
    """"<reasoning>\\n" + one line + the middle tags + one line + "\\n</answer>\\n", then the end or one more "\\n"
    (``$`` also matches before a final newline)."""
    if not text.startswith("<reasoning>\n"):
        return 0.0
    p = text.find("\n", 12)
    if p < 0 or not text.startswith(_STRICT_MID, p):
        return 0.0
    e = text.find("\n", p + len(_STRICT_MID))
    return 0.5 if e >= 0 and text[e:] in (_STRICT_TAIL, _STRICT_TAIL + "\n") else 0.0


def soft_format(text: str) -> float:
    """"<reasoning>" at the start, a "</reasoning>" on that first line, whitespace (``\\s``: ``str.isspace``), then
    "<answer>" and a "</answer>" on the line where the answer starts."""
    if not text.startswith("<reasoning>"):
        return 0.0
    n = len(text)
    first_line_end = text.find("\n", 11)
    if first_line_end < 0:
        first_line_end = n
    close = newline = -2  # cached "next </answer>" / "next newline" at or after the last answer start
    p = text.find("</reasoning>", 11)
    while 0 <= p < first_line_end:
        q = p + 12
        while q < n and text[q].isspace():
            q += 1
        if text.startswith("<answer>", q):
            s = q + 8
            if close < s:
                close = text.find("</answer>", s)
                if close < 0:
                    return 0.0  # no "</answer>" after this answer start, nor after any later one
            if 0 <= newline < s or newline == -2:
                newline = text.find("\n", s)
            if newline < 0 or close < newline:
                return 0.5
        p = text.find("</reasoning>", p + 1)
    return 0.0


def count_xml(text: str) -> float:
    count = 0.0
    if text.count("<reasoning>\n") == 1:
        count += 0.125
    if text.count("\n</reasoning>\n") == 1:
        count += 0.125
    if text.count("\n<answer>\n") == 1:
        count += 0.125
        count -= len(text.split("\n</answer>\n")[-1]) * 0.001  # bug 4: whole text when the split finds nothing
    if text.count("\n</answer>") == 1:
        count += 0.125
        count -= (len(text.split("\n</answer>")[-1]) - 1) * 0.001
    return count


# ------------------------------------------------------------------------------------------- MATH (math500_utils)


def boxed_in_answer(text: str) -> float:
    reward = 0.0
    try:
        r = text.split("<answer>")[1].split("</answer>")[0]
        reward += 1.0
    except IndexError:
        r = text
    reward += 1.0 if "\x08oxed" in r else 0.5  # bug 1: d1 wrote "\boxed", i.e. backspace + "oxed"
    return reward


def math_format(text: str) -> float:
    return boxed_in_answer(text) * 0.5


class _D1Raised(Exception):
    """Where d1's helper fails an ``assert`` (its callers catch it, or not, as d1's do)."""


def remove_boxed(s: str) -> str:
    if "\\boxed " in s:  # raises TypeError on None, as d1 does
        left = "\\boxed "
        if s[: len(left)] != left:
            raise _D1Raised("remove_boxed: '\\boxed ' not at the start")
        return s[len(left) :]
    left = "\\boxed{"
    if s[: len(left)] == left and s[-1:] == "}":
        return s[len(left) : -1]
    return s


def last_boxed_only_string(string: str) -> str | None:
    idx = string.rfind("\\boxed")
    if "\\boxed " in string:
        return "\\boxed " + string.split("\\boxed ")[-1].split("$")[0]
    if idx < 0:
        idx = string.rfind("\\fbox")
        if idx < 0:
            return string  # bug 3: no box -> the whole text
    depth, i = 0, idx
    while i < len(string):
        if string[i] == "{":
            depth += 1
        if string[i] == "}":
            depth -= 1
            if depth == 0:
                return string[idx : i + 1]
        i += 1
    return None


def math_reference(solution: str) -> str:
    """d1's reference answer: ``remove_boxed(last_boxed_only_string(solution))`` of the raw solution column.

    d1 computes it outside any ``try``: where it raises (a last ``\\boxed`` whose braces never close), d1's training
    step crashes; here a ValueError names the solution.

    >>> math_reference("so $\\\\boxed{5}$."), math_reference("so \\\\boxed {5}"), math_reference("so \\\\fbox{5}")
    ('5', '{5}', '\\\\fbox{5}')
    """
    boxed = last_boxed_only_string(solution)
    if boxed is None:
        raise ValueError(
            f"d1_compat: d1's remove_boxed(last_boxed_only_string(...)) raises TypeError on this reference (its last "
            f"\\boxed never closes), so d1 cannot score it: {solution[-120:]!r}"
        )
    return remove_boxed(boxed)


def _fix_fracs(string: str) -> str:
    substrs = string.split("\\frac")
    new_str = substrs[0]
    for substr in substrs[1:]:
        new_str += "\\frac"
        if substr[0] == "{":  # IndexError on "\frac" at the end: is_equiv falls back to raw equality
            new_str += substr
        else:
            if len(substr) < 2:
                return string
            a, b = substr[0], substr[1]
            if b != "{":
                new_str += "{" + a + "}{" + b + "}" + substr[2:]
            else:
                new_str += "{" + a + "}" + b + substr[2:]
    return new_str


def _fix_a_slash_b(string: str) -> str:
    if len(string.split("/")) != 2:
        return string
    a, b = string.split("/")
    a, b = int(a), int(b)  # ValueError escapes to is_equiv, as in d1 (only AssertionError is caught there)
    if string != f"{a}/{b}":
        return string
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _remove_right_units(string: str) -> str:
    if "\\text{ " in string:
        splits = string.split("\\text{ ")
        if len(splits) != 2:
            raise _D1Raised("remove_right_units: more than one '\\text{ '")
        return splits[0]
    return string


def _fix_sqrt(string: str) -> str:
    if "\\sqrt" not in string:
        return string
    splits = string.split("\\sqrt")
    new_string = splits[0]
    for split in splits[1:]:
        if split[0] != "{":  # IndexError on a trailing "\sqrt", caught by is_equiv
            new_string += "\\sqrt{" + split[0] + "}" + split[1:]
        else:
            new_string += "\\sqrt" + split
    return new_string


def strip_string(string: str) -> str:
    string = string.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    string = string.replace("tfrac", "frac").replace("dfrac", "frac")
    string = string.replace("\\left", "").replace("\\right", "")
    string = string.replace("^{\\circ}", "").replace("^\\circ", "")
    string = string.replace("\\$", "")
    string = _remove_right_units(string)
    string = string.replace("\\%", "")
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if len(string) == 0:
        return string
    if string[0] == ".":
        string = "0" + string
    if len(string.split("=")) == 2 and len(string.split("=")[0]) <= 2:
        string = string.split("=")[1]
    string = _fix_sqrt(string)
    string = string.replace(" ", "")
    string = _fix_fracs(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    string = _fix_a_slash_b(string)
    return string


def is_equiv(str1: str | None, str2: str | None) -> bool:
    if str1 is None and str2 is None:
        return True
    if str1 is None or str2 is None:
        return False
    try:
        return strip_string(str1) == strip_string(str2)
    except Exception:
        return str1 == str2


def math_correctness(text: str, reference: str) -> float:
    """d1's MATH correctness; ``reference`` is the already extracted reference (:func:`math_reference`)."""
    try:
        r = remove_boxed(last_boxed_only_string(text))
    except Exception:  # d1: bare `except: pass`, leaving the whole completion
        r = text
    return 2.0 if is_equiv(r, reference) else 0.0


# --------------------------------------------------------------------------------------------------- Countdown


def _last_tagged(text: str) -> str | None:
    """``re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)[-1]`` (None when no match), by a linear scan.

    findall takes, from left to right, the first ``<answer>`` and the first ``</answer>`` after it, and goes on after
    that; once an ``<answer>`` has no ``</answer>`` after it, no later one has.

    >>> _last_tagged("<answer>1</answer><answer>2<answer>3</answer>"), _last_tagged("<answer>" * 3)
    ('2<answer>3', None)
    """
    span, pos = None, 0
    while True:
        start = text.find("<answer>", pos)
        if start < 0:
            break
        end = text.find("</answer>", start + 8)
        if end < 0:
            break
        span, pos = (start + 8, end), end + 9
    return None if span is None else text[span[0] : span[1]]


def extract_solution(text: str) -> str | None:
    match = _last_tagged(text)
    return None if match is None else match.strip()


def validate_equation(equation: str, numbers: list[int]) -> bool:
    try:
        used = [int(n) for n in re.findall(r"\d+", equation)]  # \d: any Unicode digit, as in d1
    except ValueError:  # a run of more than 4300 digits
        return False
    return sorted(used) == sorted(numbers)


HUGE_BITS = 1 << 16
"""Integers longer than this many bits are tracked symbolically by :func:`python_value` instead of being built."""


@dataclass(frozen=True)
class _Huge:
    """An integer too long to build: its sign, parity (None: unknown) and a lower bound on its bit length (more than
    ``HUGE_BITS`` when made, more than 1,100 after ``//``: never within a float's range)."""

    sign: int
    odd: bool | None
    bits: int


class _Undecided(Exception):
    """An operation on huge integers whose outcome needs their exact values (impossible with three numbers)."""


def _huge(value: int) -> int | _Huge:
    bits = value.bit_length()
    return _Huge(1 if value > 0 else -1, bool(value & 1), bits) if bits > HUGE_BITS else value


def _overflow() -> OverflowError:
    return OverflowError("int too large to convert to float")  # what Python raises mixing such an int with a float


def _binop(op: str, a, b):
    """Python's ``a <op> b`` where either side may be huge; raises what Python raises, or :class:`_Undecided`."""
    ha, hb = isinstance(a, _Huge), isinstance(b, _Huge)
    if not ha and not hb:
        if op == "**" and isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1:
            if (abs(a).bit_length() - 1) * b > HUGE_BITS:  # a lower bound on the result's bits
                return _Huge(-1 if a < 0 and b & 1 else 1, bool(a & 1), (abs(a).bit_length() - 1) * b + 1)
        out = _PY_OPS[op](a, b)
        return _huge(out) if isinstance(out, int) else out
    if (ha and not isinstance(b, (int, _Huge))) or (hb and not isinstance(a, (int, _Huge))):
        raise _overflow()  # with a float or complex Python converts the huge int to float; (), ... raise too
    if op == "**":
        if ha and not hb:
            if b == 0:
                return 1
            if b < 0:
                raise _overflow()  # int ** negative int goes through float
            return _Huge(a.sign if b & 1 else 1, a.odd, a.bits * b)
        if b.sign < 0:
            raise _overflow()
        if ha:
            raise MemoryError("huge ** huge")  # d1 would square until memory runs out
        if a in (0, 1):
            return a
        if a == -1:
            if b.odd is None:
                raise _Undecided("(-1) ** huge of unknown parity")
            return -1 if b.odd else 1
        raise MemoryError("int ** huge")  # the result would have more than 2**65536 bits: d1 never finishes
    if op in ("+", "-"):
        if ha and hb:
            raise _Undecided("huge +/- huge")
        big, small, flip = (a, b, 1) if ha else (b, a, -1 if op == "-" else 1)
        odd = None if big.odd is None else big.odd ^ bool(small & 1)
        return _Huge(big.sign * flip, odd, big.bits - 1)
    if op == "*":
        if ha and hb:
            odd = None if a.odd is None or b.odd is None else a.odd and b.odd
            return _Huge(a.sign * b.sign, odd, a.bits + b.bits - 1)
        big, small = (a, b) if ha else (b, a)
        if small == 0:
            return 0
        odd = None if big.odd is None else big.odd and bool(small & 1)
        return _Huge(big.sign * (1 if small > 0 else -1), odd, big.bits)
    if ha and hb:
        raise _Undecided(f"huge {op} huge")
    if ha:  # huge / z, huge // z
        if b == 0:
            raise ZeroDivisionError("division by zero")
        room = a.bits - b.bit_length() - 1
        if op == "/":
            if room > 1100:
                raise OverflowError("integer division result too large for a float")
            raise _Undecided("huge / z near the float range")
        if room <= 1100:
            raise _Undecided("huge // z of moderate size")
        return _Huge(a.sign * (1 if b > 0 else -1), None, room)
    if a != 0 and a.bit_length() >= b.bits:  # z / huge, z // huge need |z| < |huge|
        raise _Undecided(f"z {op} huge with z as long")
    negative = (a < 0) != (b.sign < 0) and a != 0
    if op == "/":
        if b.bits - a.bit_length() < 1100:
            raise _Undecided("z / huge near the float range")
        return -0.0 if (a < 0) != (b.sign < 0) else 0.0
    return -1 if negative else 0


_PY_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
           "//": operator.floordiv, "**": operator.pow}
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Pow: "**"}


_LIMIT_LOCK = threading.Lock()


def _parse_tree(equation: str) -> ast.Expression:
    """``ast.parse(equation, mode="eval")`` of a text ``compile`` accepted. Converting the tree to Python objects has
    its own recursion check, stricter than compile's (about 1,000 nested unary signs fail there, not in eval). Only
    then, and only for that parse, the interpreter's recursion limit is raised, under a lock, and restored: the
    interpreter has one limit for all threads, so a thread recursing deeply at that moment sees the higher limit
    (ordinary answers, nested less than that, never touch it; d1's completions cannot reach that depth). The depth
    is bounded by the compile before, and the walk after uses no recursion."""
    try:
        return ast.parse(equation, mode="eval")
    except RecursionError:
        pass
    with _LIMIT_LOCK:
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 100_000))
        try:
            return ast.parse(equation, mode="eval")
        finally:
            sys.setrecursionlimit(limit)


def python_value(equation: str):
    """What ``eval(equation, {"__builtins__": None}, {})`` returns, for texts over d1's characters
    ``[0-9+\\-*/().\\s]``; raises what it raises (any exception: d1 then scores ``format_score``).

    The text is compiled by CPython itself (``compile``, as ``eval`` does, for its syntax and compile-time errors; the
    code is never run), parsed with ``ast.parse``, and the tree evaluated here, operand by operand, with Python's
    operators. The value is exactly ``eval``'s whenever every integer has at most ``HUGE_BITS`` bits. A longer integer
    (from ``**``) is tracked by sign, parity and size; that settles every expression with at most three numbers:
    ``huge ** 0`` is 1, ``huge * 0`` is 0, ``z / huge`` is 0.0, ``z // huge`` is 0 or -1, ``(+-1) ** huge`` is +-1,
    a huge value mixed with a float raises OverflowError as Python does, and a huge result never equals a target.

    Where d1 itself never returns, or not reproducibly:

    - ``z ** huge`` with ``|z| >= 2`` (``9**9**9**9``, ``2**3**700000``): the result would have more than
      ``2**65536`` bits; d1's ``eval`` squares until the memory runs out, then its ``except`` scores
      ``format_score``. Here: MemoryError at once, so the same ``format_score``.
    - expressions nested more than about 1,000 levels (unary signs, powers; parentheses stop at 200): CPython's
      parser and compiler refuse them at a depth set by the interpreter version and the caller's stack
      (RecursionError, MemoryError: ``format_score``; Python 3.11 here: near 3,000 unary signs, d1's 3.10 near the
      same, less its call depth); here the running interpreter decides, as it would for d1's ``eval``. d1's
      completions (at most 512 tokens) cannot reach that depth.
    - two huge integers combined by ``+ - / //``, or ``(-1) ** (huge // z)``, need four or more numbers: raised as
      :class:`_Undecided` (``format_score``; d1 may score them otherwise after computing megabyte integers).

    >>> python_value("(2**200000)**0"), python_value("2**3**20 * 0"), python_value("3 / 2**2**30")
    (1, 0, 0.0)
    >>> python_value("7 // 2 + 1.5"), python_value("(-8) ** (1/3)") == (-8) ** (1 / 3)
    (4.5, True)
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "'int' object is not callable" SyntaxWarning; eval prints it and runs on
        compile(equation, "<answer>", "eval")  # what eval compiles: its errors, on this interpreter; never run
        tree = _parse_tree(equation)
    # Post-order walk with an explicit stack (no Python recursion, whatever the depth).
    stack: list[tuple[ast.AST, int]] = [(tree.body, 0)]
    values: list = []
    while stack:
        node, state = stack.pop()
        if isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float)) and node.value is not Ellipsis:
                raise TypeError(f"unexpected constant {node.value!r}")
            values.append(_huge(node.value) if type(node.value) is int else node.value)
        elif isinstance(node, ast.Tuple) and not node.elts:  # "()": no commas get past d1's character check
            values.append(())
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            if state == 0:
                stack += [(node, 1), (node.operand, 0)]
                continue
            v = values.pop()
            if isinstance(v, _Huge):
                values.append(_Huge(-v.sign, v.odd, v.bits) if isinstance(node.op, ast.USub) else v)
            else:
                values.append(-v if isinstance(node.op, ast.USub) else +v)  # TypeError on () and ..., as Python
        elif isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            if state == 0:
                stack += [(node, 1), (node.right, 0), (node.left, 0)]
                continue
            b, a = values.pop(), values.pop()
            values.append(_binop(_AST_OPS[type(node.op)], a, b))
        elif isinstance(node, ast.Call):
            # The callee and arguments are evaluated (any error or endless power first), then the call fails: no
            # value here is callable, and a starred or ** argument is not iterable / a mapping.
            parts = [node.func, *node.args, *(k.value for k in node.keywords)]
            if state == 0:
                stack.append((node, 1))
                stack += [(p.value if isinstance(p, ast.Starred) else p, 0) for p in reversed(parts)]
                continue
            raise TypeError("object is not callable")
        else:
            raise TypeError(f"unexpected syntax {type(node).__name__}")
    return values[0]


def evaluate_equation(equation: str):
    if not re.match(r"^[\d+\-*/().\s]+$", equation):
        return None
    try:
        return python_value(equation)
    except Exception:  # d1: bare `except`, including MemoryError and RecursionError
        return None


def countdown_score(text: str, target: int, numbers: list[int], format_score: float = 0.1, score: float = 1.0) -> float:
    equation = extract_solution(text)
    if equation is None:
        return 0.0
    if not validate_equation(equation, numbers):
        return format_score
    result = evaluate_equation(equation)
    if result is None:
        return format_score
    if isinstance(result, _Huge):
        return format_score  # |result - target| is astronomically large
    try:
        return score if abs(result - target) < 1e-5 else format_score
    except Exception:
        return format_score


# ------------------------------------------------------------------------------------------------------ Sudoku


def extract_answer_sudoku(text: str) -> str | None:
    match = _last_tagged(text)
    if match is not None:
        return "".join(ch for ch in match.strip() if ch.isdigit())
    return None


def sudoku_score(text: str, puzzle: str, solution: str) -> float:
    answer = extract_answer_sudoku(text)
    if answer is None or len(answer) == 0:
        return 0.0
    answer = (answer + "0" * 16)[:16]
    empty = [i for i in range(16) if puzzle[i] == "0"]
    if not empty:
        return 0.0
    return sum(1 for i in empty if answer[i] == solution[i]) / len(empty)
