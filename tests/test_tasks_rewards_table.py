"""Hand-made completions (at least 20 per task): this project's reward next to d1's (``d1_compat=True``), every
difference explained. The same cases render docs/rewards.md:

    python -m tests.test_tasks_rewards_table      # rewrites docs/rewards.md

and ``test_docs_table_is_current`` fails when the file is stale.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stp.tasks import get_task

R = "<reasoning>\nJanet sells 16 - 3 - 4 = 9 eggs.\n9 * 2 = 18 dollars.\n</reasoning>\n"  # multi-line reasoning
R1 = "<reasoning>\n9 * 2 = 18\n</reasoning>\n"  # one-line reasoning
MR = "<reasoning>\nHalf of the cake is left.\nSo the fraction is one half.\n</reasoning>\n"
GARBAGE = "x" * 10_000
G = {"question": "Janet's ducks lay 16 eggs ...", "answer": "18"}
M = {"problem": "What fraction is left?", "answer": "\\frac{1}{2}"}
C = {"nums": [44, 19, 35], "target": 98}
S = {"puzzle": "1034340020004300", "solution": "1234341221434321"}
SOL = "1234341221434321"

DOTALL = ("d1's soft/strict format regexes lack re.DOTALL, so multi-line reasoning never matches them "
          "(fixed: +0.5 soft, +0.5 strict)")
BOXBUG = "d1's format check looks for '\\x08oxed' (the \"\\b\" escape bug), never found: box credit 0.5 instead of 1"
SOFT = ("d1's soft-format regex lacks re.DOTALL, so it can never match the requested format, which has a newline "
        "right after <reasoning> (fixed: +0.5)")
NOTAGS = "d1's extractor returns the whole completion when there is no <answer> tag; here no tags means no answer"
NOEXPR = "d1 gives 0.1 to any tagged answer; here 0.1 needs the answer to parse as an arithmetic expression"

# (task, example, completion, why the two rewards differ; "" when they agree)
CASES: list[tuple[str, dict, str, str]] = [
    # ------------------------------------------------------------------ GSM8K
    ("gsm8k", G, R + "<answer>\n18\n</answer>\n", DOTALL),
    ("gsm8k", G, R1 + "<answer>\n18\n</answer>\n", SOFT),
    ("gsm8k", G, R + "<answer>\n17\n</answer>\n", DOTALL),
    ("gsm8k", G, R1 + "<answer>\n18\n</answer>",
     "no newline after </answer>: d1's count_xml then penalises every character of the completion (0.001 each); "
     "here only text after </answer> is penalised"),
    ("gsm8k", G, "18", NOTAGS),
    ("gsm8k", G, "The answer is 18.", ""),
    ("gsm8k", {"question": "...", "answer": "1000"}, R1 + "<answer>\n1,000\n</answer>\n",
     "answers compared as numbers here (thousands commas allowed); d1 compares strings and needs isdigit()"),
    ("gsm8k", G, R1 + "<answer>\n$18\n</answer>\n", "numbers compared as numbers here ('$18' = 18); d1: strings"),
    ("gsm8k", G, R1 + "<answer>\n18.0\n</answer>\n",
     "18.0 equals 18 as a number here (2.0) but is not an integer literal (no int reward); d1: strings"),
    ("gsm8k", {"question": "...", "answer": "-3"}, R1 + "<answer>\n-3\n</answer>\n",
     "d1's int reward uses str.isdigit(), which rejects negative integers"),
    ("gsm8k", G, R1 + "<answer>\n\\boxed{18}\n</answer>\n",
     "a \\boxed{} number inside the answer counts here (d1's own eval parser accepts it); d1's reward compares strings"),
    ("gsm8k", G, R1 + "<answer>\n18\n</answer>\n" + "<|endoftext|>" * 4, SOFT),
    ("gsm8k", G, R1 + "<answer>\n18\n</answer>\n" + "z" * 300,
     "300 characters after </answer>: d1's penalty is unbounded (-0.6 here); here each tag's credit stops at 0"),
    ("gsm8k", G, GARBAGE, ""),
    ("gsm8k", G, R1 + "<answer>\n18",
     "unclosed <answer> at the end: both read '18'; d1's count_xml penalises the whole text (no '\\n</answer>\\n'), "
     "here the missing tag only loses its 0.125"),
    ("gsm8k", G, R + "<answer>\n\\boxed{18}<|eot_id|>",
     "unclosed answer cut at a special token, boxed: here '18'; d1 compares the string '\\boxed{18}<|eot_id|>'"),
    ("gsm8k", {"question": "...", "answer": "1080", "solution": "3 * 360 = 1080\n#### 1,080"},
     R1 + "<answer>\n1080\n</answer>\n",
     "d1's reference is the raw '1,080' after '####' (commas kept) and it compares strings; here numbers: 1080"),
    ("gsm8k", {"question": "...", "answer": "1080", "solution": "3 * 360 = 1080\n#### 1,080"},
     R1 + "<answer>\n1,080\n</answer>\n",
     "d1's int reward needs isdigit() ('1,080' fails) and d1's soft format needs one-line reasoning; "
     "here '1,080' is the integer 1080"),
    ("gsm8k", G, R1 + "<answer>\n１８\n</answer>\n",
     "full-width digits: d1's isdigit() accepts them (int reward 0.5); here answers are ASCII numbers"),
    ("gsm8k", G, R1 + "<answer>\n17\n</answer>\n<answer>\n18\n</answer>\n", DOTALL),
    ("gsm8k", G, R1 + "<answer>\n18 dollars\n</answer>\n", SOFT),
    ("gsm8k", G, R1 + "<answer>\n10**10000\n</answer>\n", SOFT),
    ("gsm8k", G, "<reasoning>\n" + "(" * 5000 + "\n</reasoning>\n", ""),
    ("gsm8k", G, "", ""),
    # ------------------------------------------------------------------- MATH
    ("math", M, MR + "<answer>\n\\boxed{\\frac{1}{2}}\n</answer>", BOXBUG),
    ("math", M, MR + "<answer>\n\\boxed{\\dfrac{1}{2}}\n</answer>", BOXBUG),
    ("math", M, MR + "<answer>\n$\\boxed{0.5}$\n</answer>", BOXBUG),
    ("math", M, MR + "<answer>\n\\boxed{\\frac12}\n</answer>", BOXBUG),
    ("math", M, MR + "<answer>\n\\boxed{1/2}\n</answer>", BOXBUG),
    ("math", M, MR + "<answer>\n\\boxed{0.50}\n</answer>",
     BOXBUG + "; and 0.50 = 1/2 as exact numbers here, while d1 only maps the string '0.5'"),
    ("math", M, MR + "<answer>\n\\boxed{\\frac{1}{3}}\n</answer>", BOXBUG),
    ("math", M, MR + "<answer>\n\\frac{1}{2}\n</answer>", ""),
    ("math", M, "\\frac{1}{2}",
     "no \\boxed: d1 compares the whole completion with the reference (2.0); here no box means no answer"),
    ("math", {"problem": "...", "answer": "90"}, MR + "<answer>\n\\boxed{90^\\circ}\n</answer>", BOXBUG),
    ("math", {"problem": "...", "answer": "10"}, MR + "<answer>\n\\boxed{10\\text{ cm}}\n</answer>", BOXBUG),
    ("math", {"problem": "...", "answer": "10"}, MR + "<answer>\n\\boxed{10\\text{cm}}\n</answer>",
     BOXBUG + "; and d1 drops units only when written '\\text{ ' with a space"),
    ("math", {"problem": "...", "answer": "(1,2)"}, MR + "<answer>\n\\boxed{\\left( 1, 2 \\right)}\n</answer>", BOXBUG),
    ("math", {"problem": "...", "answer": "5"}, MR + "<answer>\n\\boxed{\\boxed{5}}\n</answer>", BOXBUG),
    ("math", M, MR + "<answer>\n\\boxed{\\frac{1}{2}\n</answer>", BOXBUG + "; unbalanced braces: no answer in both"),
    ("math", {"problem": "...", "answer": "5"}, MR + "<answer>\n\\boxed{5.}\n</answer>",
     BOXBUG + "; and a trailing period is dropped here, not in d1"),
    ("math", {"problem": "...", "answer": "5"}, MR + "<answer>\nso \\boxed 5\n</answer>", BOXBUG),
    ("math", {"problem": "...", "answer": "5"}, MR + "<answer>\n\\boxed{5} or \\boxed{6}\n</answer>", BOXBUG),
    ("math", M, GARBAGE, ""),
    ("math", {"problem": "...", "answer": "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"},
     MR + "<answer>\n\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}\n</answer>", BOXBUG),
    ("math", M, MR + "<answer>\n\\boxed{\\\\frac{1}{2}}\n</answer>", BOXBUG),
    ("math", {"problem": "...", "answer": "5", "solution": "So the answer is $\\boxed {5}$."},
     MR + "<answer>\n\\boxed{5}\n</answer>",
     BOXBUG + "; and d1's helpers read the solution's '\\boxed {5}' as '{5}', which '5' does not equal"),
    ("math", {"problem": "...", "answer": "\\text{(C)}"}, MR + "<answer>\n\\boxed{(C)}\n</answer>",
     BOXBUG + "; and \\text{...} that is the whole answer is unwrapped here"),
    # -------------------------------------------------------------- Countdown
    ("countdown", C, R1 + "<answer>\n44 + 19 + 35\n</answer>", ""),
    ("countdown", C, R1 + "<answer>\n(35 + 44) + 19\n</answer>", ""),
    ("countdown", {"nums": [6, 3, 8], "target": 16}, R1 + "<answer>\n8 * 6 / 3\n</answer>", ""),
    ("countdown", C, R1 + "<answer>\n44 + 19 - 35\n</answer>", ""),
    ("countdown", C, R1 + "<answer>\n44 + 44 + 19\n</answer>", ""),
    ("countdown", C, R1 + "<answer>\n44 + 35\n</answer>", ""),
    ("countdown", C, R1 + "<answer>\n44 + 19 + 35 = 98\n</answer>", NOEXPR + " ('=' is not part of one)"),
    ("countdown", C, R1 + "<answer>\nI could not find one.\n</answer>", NOEXPR),
    ("countdown", C, R1 + "<answer></answer>", NOEXPR),
    ("countdown", C, "44 + 19 + 35", ""),
    ("countdown", {"nums": [5, 5, 3], "target": 3}, R1 + "<answer>\n3 / (5 - 5)\n</answer>", ""),
    ("countdown", {"nums": [4, 3, 2], "target": 4096}, R1 + "<answer>\n4**(3*2)\n</answer>",
     "d1 evaluates with Python eval, so '**' (power) is accepted; the task allows only + - * /"),
    ("countdown", {"nums": [7, 2, 1], "target": 3}, R1 + "<answer>\n7 // 2 * 1\n</answer>",
     "d1 accepts Python's '//' (floor division); the task allows only + - * /"),
    ("countdown", {"nums": [1, 5, 2], "target": 3}, R1 + "<answer>\n1.5 * 2\n</answer>",
     "d1 reads the digits of '1.5' as the numbers 1 and 5 and accepts it; here only integer literals are numbers, "
     "and '1.5' is not one, so this is no expression"),
    ("countdown", {"nums": [10, 3, 5], "target": 2}, R1 + "<answer>\n-3 + 10 - 5\n</answer>", ""),
    ("countdown", C, R1 + "<answer>\n" + "(" * 100 + "44 + 19 + 35" + ")" * 100 + "\n</answer>",
     "d1's eval accepts up to 200 nested parentheses (1.0); nesting deeper than 32 levels is refused here (a size "
     "limit against hostile input)"),
    ("countdown", C, R1 + "<answer>\n" + "(" * 201 + "44 + 19 + 35" + ")" * 201 + "\n</answer>",
     "d1's eval raises 'too many nested parentheses' (0.1); here nesting is refused and no expression is present"),
    ("countdown", C, R1 + "<answer>\n44\v+ 19 + 35\n</answer>",
     "a vertical tab passes d1's character check (\\s) but Python's parser rejects it (0.1); here it is whitespace"),
    ("countdown", C, R1 + "<answer>\n\\boxed{44 + 19 + 35}\n</answer>",
     "an expression boxed inside the answer counts here; d1's character check rejects the backslash (0.1)"),
    ("countdown", C, R1 + "<answer>\n44 + 19 + 35",
     "unclosed <answer> at the end counts here; d1's regex needs </answer> (0)"),
    ("countdown", C, R1 + "<answer>\n10**10000\n</answer>", NOEXPR + " ('**' is not an operator here)"),
    ("countdown", C, R1 + "<answer>\n9e999\n</answer>", NOEXPR),
    ("countdown", C, R1 + "<answer>\n44\n</answer> wait <answer>\n44 + 19 + 35\n</answer>", ""),
    ("countdown", C, GARBAGE, ""),
    # ----------------------------------------------------------------- Sudoku
    ("sudoku", S, R1 + f"<answer>\n{SOL}\n</answer>", ""),
    ("sudoku", S, R1 + "<answer>\n1234\n3412\n2143\n4321\n</answer>", ""),
    ("sudoku", S, R1 + "<answer>\n1 2 3 4, 3 4 1 2, 2 1 4 3, 4 3 2 1\n</answer>", ""),
    ("sudoku", S, R1 + "<answer>\n1234341221434312\n</answer>", ""),
    ("sudoku", S, R1 + "<answer>\n1234\n</answer>", ""),
    ("sudoku", S, SOL, ""),
    ("sudoku", S, R1 + "<answer>\n</answer>", ""),
    ("sudoku", S, R1 + f"<answer>\n{SOL}4321\n</answer>", ""),
    ("sudoku", S, R1 + "<answer>\nR1: 1234\nR2: 3412\nR3: 2143\nR4: 4321\n</answer>", ""),
    ("sudoku", S, R1 + f"<answer>\n1<answer>\n{SOL}\n</answer>",
     "nested <answer>: d1's regex takes the text from the first <answer>; the shared extractor pairs the last "
     "</answer> with the last <answer> before it"),
    ("sudoku", S, R1 + "<answer>\n0000000000000000\n</answer>\n<answer>\n" + SOL + "\n</answer>", ""),
    ("sudoku", S, GARBAGE, ""),
    ("sudoku", S, R1 + "<answer>\n1034340020004300\n</answer>", ""),
    ("sudoku", S, R1 + f"<answer>\n²{SOL}\n</answer>",
     "d1 keeps every character with str.isdigit(), superscript '²' included, which shifts the grid; here only 0-9"),
    ("sudoku", S, R1 + f"<answer>\n{SOL}",
     "unclosed <answer> at the end counts here; d1's regex needs </answer> (0)"),
    ("sudoku", S, R1 + "<answer>\n1111111111111111\n</answer>", ""),
    ("sudoku", S, R1 + "<answer>\nabcdabcdabcdabcd\n</answer>", ""),
    ("sudoku", {"puzzle": "0000341200004300", "solution": SOL}, R1 + f"<answer>\n{SOL}\n</answer>", ""),
    ("sudoku", {"puzzle": "0000341200004300", "solution": SOL}, R1 + "<answer>\n1234341221434312\n</answer>", ""),
    ("sudoku", S, "<reasoning>\nRow 1 misses 2, row 2 misses 1 and 2.\n</reasoning>\n"
     f"<answer>\n{SOL}\n</answer>\n", ""),
]


def _scores(task_name: str, example: dict, completion: str) -> tuple[dict, dict]:
    return (get_task(task_name).rewards(completion, example),
            get_task(task_name, d1_compat=True).rewards(completion, example))


def _fmt(values: dict) -> str:
    total = sum(values.values())
    parts = " + ".join(f"{v:g}" for v in values.values())
    return f"**{total:.3g}**" + (f" ({parts})" if len(values) > 1 else "")


def _show(text: str) -> str:
    if len(text) > 90:
        text = text[:60] + f"…[{len(text)} chars]…" + text[-20:]
    return "`" + text.replace("\n", "⏎").replace("|", "\\|").replace("`", "'") + "`" if text else "(empty)"


def render() -> str:
    lines = [
        "# Rewards: this project vs the d1 protocol",
        "",
        "Generated by `python -m tests.test_tasks_rewards_table` from the cases in "
        "`tests/test_tasks_rewards_table.py`; do not edit by hand (a test checks it is current).",
        "",
        "*This project* is `get_task(name)` (the default, `d1_compat=False`); *d1* is `get_task(name, d1_compat=True)`, "
        "a faithful re-implementation of d1's published reward code (`stp/tasks/_d1.py`), bugs included. Totals in "
        "bold, then the per-function values in the order of `Task.reward_functions`:",
        "",
        "- gsm8k: xmlcount + soft_format + strict_format + int + correctness (max 4.0)",
        "- math: correctness + format (max 3.0; d1 max 2.75)",
        "- countdown: one reward, 1.0 / 0.1 / 0; sudoku: one reward, fraction of empty cells right",
        "",
        "`⏎` is a newline. Every row where the two differ says why.",
        "",
        "## d1's bugs and what this project does instead",
        "",
        "1. **MATH format, `\"\\b\"` escape.** d1 checks `\"\\boxed\" in r` in a non-raw string: `\\b` is a backspace, so "
        "it looks for `\"\\x08oxed\"`, never present; every completion got the 0.5 \"no box\" credit. Fixed: the test "
        "is for the literal `\\boxed`.",
        "2. **No `re.DOTALL`.** d1's GSM8K soft and strict format regexes ran without `re.DOTALL`, so `.` stopped at "
        "newlines: the soft one can never match the requested format (a newline follows `<reasoning>`), and the "
        "strict one matched only one-line reasoning and answer. "
        "Fixed: `re.DOTALL`.",
        "3. **Missing tags.** d1's GSM8K extractor returns the whole completion when `<answer>` is missing, and its "
        "MATH extractor the whole completion when `\\boxed` is missing, so a bare `18` earned 2.5. Fixed: one shared "
        "extractor (`stp.tasks.extract.answer_block`: the last `<answer>` block, closed or left open at the end of the "
        "text); no block, no answer.",
        "4. **Unbounded length penalty.** d1's `count_xml` subtracts 0.001 per character of the *whole* completion when "
        "it has `\\n<answer>\\n` but not `\\n</answer>\\n`, and its trailing-text penalty has no floor. Fixed: only "
        "text after `</answer>` is penalised, and each tag's credit is floored at 0 (xmlcount stays in [0, 0.5]).",
        "5. **`eval` in Countdown.** d1 evaluates the answer with Python `eval` after a character check, so `**`, `//` "
        "and decimals (read as two numbers) were accepted, and `9**9**9` could hang a worker. Fixed: a safe parser "
        "(`stp.tasks.arith`): integer literals, + - * /, unary signs, parentheses, exact fractions, size and depth "
        "limits; \"expression present\" (0.1) means the answer parses.",
        "",
        "Choices that are not d1 bugs, also visible below: GSM8K answers compare as numbers (`1,000`, `$18`, `18.0`, "
        "`\\boxed{18}` all equal 18; the integer reward accepts a sign); MATH equivalence also accepts exact numeric "
        "equality (`0.50` = `\\frac12`), `\\text{}` units without a space, trailing periods, matrices however spaced "
        "(`\\begin{pmatrix}1\\\\2\\end{pmatrix}`), doubled backslashes (`\\\\frac{1}{2}`, read as d1 reads them).",
        "",
        *policy_section(),
        *compat_section(),
    ]
    for task_name in ("gsm8k", "math", "countdown", "sudoku"):
        lines += [f"## {task_name}", "", "| # | completion | example | this project | d1 | why they differ |",
                  "|---|---|---|---|---|---|"]
        rows = [c for c in CASES if c[0] == task_name]
        for i, (_, example, completion, why) in enumerate(rows, start=1):
            ours, d1 = _scores(task_name, example, completion)
            key = {k: v for k, v in example.items() if k in ("answer", "solution", "nums", "target", "puzzle")}
            lines.append(f"| {i} | {_show(completion)} | {_show(str(key))} | {_fmt(ours)} | {_fmt(d1)} | "
                         f"{why.replace('|', '/') if ours != d1 else ''} |")
        lines.append("")
    return "\n".join(lines)


def policy_section() -> list[str]:
    """The default-mode choices with their numbers (``tests/test_rewards_policy.py``)."""
    from tests.test_rewards_policy import policy_counts

    c = policy_counts()
    return [
        "## Default-mode choices, with numbers",
        "",
        "Counted on the realistic completions built in `tests/test_rewards_policy.py` (LLaDA-style outputs, each "
        "answer written in every form LLaDA uses), and on d1's published LLaDA-8B-Instruct evaluation generations "
        "(`python -m tests.test_rewards_policy D1_CHECKOUT`, all generation lengths, special-token text removed as "
        "the trainer's decoding removes it): 3,390 GSM8K and 768 Countdown outputs.",
        "",
        "1. **An answer left open at the end counts.** LLaDA often ends with end-of-text where `</answer>` belongs. "
        "The answer is then the text after the last `<answer>` (up to the end, or to a special token's `<|`); an "
        "empty open block leaves a complete one before it as the answer. The closing tag still pays through the "
        "format rewards (GSM8K: up to 0.125 + 0.5 + 0.5; MATH's format reward needs a complete block), so a closed "
        f"answer always scores more. Realistic set: {c['gsm_open']} of {c['gsm_total']} GSM8K completions are open, "
        f"all {c['gsm_open_correct']} right ones now earn correctness (closed-only reading: "
        f"{c['gsm_correct_closed_only']} of the set's {c['gsm_correct']} right answers; d1 reads "
        f"{c['gsm_open_correct_d1']} of the open ones, those without a box or a special token). d1's generations: "
        "406 of 3,390 GSM8K outputs are open, 301 of them right (0 under the closed-only reading). Sudoku and "
        "Countdown read the same answer (d1's regex gives 0 there).",
        "2. **Countdown: an expression boxed inside the answer counts**, with `\\times`, `\\cdot`, `\\div` as "
        "`*`, `*`, `/` (d1's own evaluation prompt asks for `\\boxed{}` and its evaluation parser maps these "
        f"operators). Realistic set: {c['cd_boxed']} of {c['cd_total']} boxed, all {c['cd_boxed_right']} right "
        f"(d1's reward: {c['cd_boxed_right_d1']}). d1's generations: 672 of 768 Countdown answers are boxed, 123 of "
        "them right here, 0 under d1's reward (its character check rejects the backslash) and 0 before this choice.",
        "3. **GSM8K numbers are ASCII.** `１８` (full-width), `١٨` (Arabic-Indic) are not the number 18, as Sudoku "
        "reads only `0-9`: neither correctness nor the integer reward. d1's generations hold no non-ASCII digit in "
        "any GSM8K answer (0 of 3,390), so the choice costs nothing on real outputs and closes a way to earn the "
        "integer reward with digits the tokenizer rarely emits.",
        "",
    ]


def compat_section() -> list[str]:
    return [
        "## How `d1_compat=True` follows d1 exactly",
        "",
        "- **References as d1 loads them.** GSM8K: `solution.split(\"####\")[1].strip()`, thousands commas kept "
        "(`1,080`, compared as a string); MATH: d1's `remove_boxed(last_boxed_only_string(solution))` of the raw "
        "solution (`\\boxed {5}` is `{5}`, `\\boxed 5 apples` is `5 apples`, an `\\fbox` only without any "
        "`\\boxed`, no box: the whole solution; an unclosed last box is an error, as d1's training step crashes "
        "there).",
        "- **Countdown as `eval` reads it.** The answer is parsed by CPython's own parser (never executed) and "
        "evaluated exactly: whitespace Python rejects (`\\v`, no-break space) scores 0.1, up to 200 nested "
        "parentheses are fine, no length or digit limit. Integer powers beyond 65,536 bits are tracked by sign, "
        "parity and size: `(2**200000)**0` is 1, `2**3**20 * 0` is 0, `3 / 2**2**30` is 0.0. Where d1 never "
        "returns (`9**9**9**9`: its `eval` squares until memory runs out, then its bare `except` gives 0.1) the "
        "reward is that 0.1 at once. Expressions nested beyond about 1,000 levels are refused by the interpreter's "
        "parser at a depth that depends on the Python version and call stack, for d1 as here (0.1); d1's 512-token "
        "completions cannot reach it. Two huge integers combined (four numbers or more) score 0.1 undecided.",
        "- **Linear time.** d1's regexes backtrack quadratically (`\"<answer>\" * k`); the same texts are "
        "accepted by string scans (checked against the regexes on random texts).",
        "",
    ]


DOC = Path(__file__).resolve().parents[1] / "docs" / "rewards.md"


def test_at_least_twenty_cases_per_task():
    for name in ("gsm8k", "math", "countdown", "sudoku"):
        assert sum(c[0] == name for c in CASES) >= 20, name


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_every_difference_is_explained(case):
    task_name, example, completion, why = case
    ours, d1 = _scores(task_name, example, completion)
    if ours != d1:
        assert why, f"{task_name}: {completion[:80]!r}: ours {ours} != d1 {d1} with no explanation"
    else:
        assert not why, f"{task_name}: {completion[:80]!r}: explained difference but both give {ours}"


def test_docs_table_is_current():
    assert DOC.is_file() and DOC.read_text(encoding="utf-8") == render(), (
        "docs/rewards.md is stale: run `python -m tests.test_tasks_rewards_table`")


if __name__ == "__main__":
    DOC.write_text(render(), encoding="utf-8")
    print(f"wrote {DOC}")
