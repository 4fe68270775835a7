"""Default-mode choices (not d1's), on a set of realistic completions, with the numbers docs/rewards.md quotes.

The set imitates LLaDA-8B-Instruct's outputs under d1's prompts (taken as patterns from d1's published evaluation
generations; no text is copied): multi-line reasoning, a blank line before ``<answer>``, the answer boxed or bare, the
closing tag present or replaced by end-of-text (decoded away, or left as ``<|eot_id|>`` text).

    python -m tests.test_rewards_policy D1_CHECKOUT     # the same counts on d1's published generations

reads ``eval/eval_baselines/*_generations.json`` of a d1 checkout (not part of this repository).
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest

from stp.tasks import get_task
from stp.tasks.extract import answer_block, closed_answer_block
from stp.tasks.latex import is_equiv

GSM_ITEMS = [("18", "16 - 3 - 4 = 9 eggs are left.\n9 * 2 = 18 dollars."), ("3", "2 + 1 = 3 bolts."),
             ("70000", "The house is worth 80000 * 2.5 = 200000.\n200000 - 130000 = 70000."),
             ("540", "3 sprints * 3 times = 9 sprints.\n9 * 60 = 540 meters."),
             ("20", "15 + 25 = 40 cups.\n60 - 40 = 20."),
             ("64", "8 glasses at 5 and 8 at 3.\n40 + 24 = 64."), ("260", "20 * 13 = 260 sheep."),
             ("160", "2 hours at 80 = 160 miles.")]
GSM_FORMS = {  # how the answer is written, and how the text ends
    "closed": "<answer>\n{a}\n</answer>",
    "closed-boxed": "<answer>\n\\boxed{{{a}}}\n</answer>",
    "open-boxed": "<answer>\n\\boxed{{{a}}}",
    "open": "<answer>\n{a}",
    "open-eot": "<answer>\n\\boxed{{{a}}}<|eot_id|><|endoftext|><|endoftext|>",
    "no-answer": "So the answer is {a}.",
}
CD_ITEMS = [([44, 19, 35], 98, "44 + 19 + 35"), ([6, 3, 8], 16, "8 * 6 / 3"), ([49, 55, 53], 51, "49 + 55 - 53"),
            ([10, 3, 5], 2, "10 - 3 - 5"), ([4, 7, 2], 30, "4 * 7 + 2"), ([90, 3, 6], 36, "90 / 3 + 6")]
CD_FORMS = {
    "closed": "<answer>\n{e}\n</answer>",
    "closed-boxed": "<answer>\n\\boxed{{{e}}}\n</answer>",
    "closed-boxed-latex": "<answer>\n\\boxed{{{t}}}\n</answer>",
    "open-boxed": "<answer>\n\\boxed{{{e}}}",
    "open": "<answer>\n{e}",
}


def gsm8k_set() -> list[tuple[str, dict, str]]:
    out = []
    for (answer, reasoning), (form, template) in itertools.product(GSM_ITEMS, GSM_FORMS.items()):
        text = f"<reasoning>\n{reasoning}\n</reasoning>\n\n" + template.format(a=answer)
        out.append((form, {"question": "q", "answer": answer}, text))
    return out


def countdown_set() -> list[tuple[str, dict, str]]:
    out = []
    for (nums, target, expr), (form, template) in itertools.product(CD_ITEMS, CD_FORMS.items()):
        latex = expr.replace("*", "\\times").replace("/", "\\div")
        text = f"<reasoning>\nTry {expr} = {target}.\n</reasoning>\n\n" + template.format(e=expr, t=latex)
        out.append((form, {"nums": nums, "target": target}, text))
    return out


def policy_counts() -> dict[str, int]:
    """The numbers docs/rewards.md quotes, from the realistic sets."""
    gsm, cd, default_gsm, default_cd = gsm8k_set(), countdown_set(), get_task("gsm8k"), get_task("countdown")
    open_gsm = [c for c in gsm if closed_answer_block(c[2]) is None and answer_block(c[2]) is not None]
    boxed_cd = [c for c in cd if "\\boxed" in (answer_block(c[2]) or "")]
    return {
        "gsm_total": len(gsm),
        "gsm_open": len(open_gsm),
        "gsm_open_correct": sum(default_gsm.metric(c[2], c[1]) == 1.0 for c in open_gsm),
        "gsm_open_correct_d1": sum(get_task("gsm8k", d1_compat=True).metric(c[2], c[1]) == 1.0 for c in open_gsm),
        "gsm_correct": sum(default_gsm.metric(c[2], c[1]) == 1.0 for c in gsm),
        "gsm_correct_closed_only": sum(
            default_gsm.rewards(c[2], c[1])["correctness_reward"] == 2.0 and closed_answer_block(c[2]) is not None
            for c in gsm),
        "cd_total": len(cd),
        "cd_boxed": len(boxed_cd),
        "cd_boxed_right": sum(default_cd.reward(c[2], c[1]) == 1.0 for c in boxed_cd),
        "cd_boxed_right_d1": sum(get_task("countdown", d1_compat=True).reward(c[2], c[1]) == 1.0 for c in boxed_cd),
        "cd_right": sum(default_cd.reward(c[2], c[1]) == 1.0 for c in cd),
    }


# ------------------------------------------------------------------------------------------------------- tests


def test_open_answer_at_the_end_gets_correctness_but_less_than_a_closed_one():
    task = get_task("gsm8k")
    closed = "<reasoning>\na\nb\n</reasoning>\n<answer>\n18\n</answer>\n"
    for text in ("<reasoning>\na\nb\n</reasoning>\n<answer>\n18", "<reasoning>\na\n</reasoning>\n<answer>\n\\boxed{18}",
                 "<reasoning>\na\n</reasoning>\n<answer>\n18<|eot_id|><|endoftext|>"):
        values = task.rewards(text, {"answer": "18"})
        assert values["correctness_reward"] == 2.0 and task.metric(text, {"answer": "18"}) == 1.0, text
        assert task.reward(text, {"answer": "18"}) < task.reward(closed, {"answer": "18"})
    # An empty block left open does not hide a complete one before it; a wrong open answer earns nothing.
    assert task.metric("<answer>\n18\n</answer>\n<answer>\n", {"answer": "18"}) == 1.0
    assert task.metric("<answer>\n17", {"answer": "18"}) == 0.0
    # Sudoku and Countdown read the same answer.
    assert get_task("sudoku").reward("<answer>\n1234341221434321", {
        "puzzle": "1034340020004300", "solution": "1234341221434321"}) == 1.0
    assert get_task("countdown").reward("<answer>\n44 + 19 + 35", {"nums": [44, 19, 35], "target": 98}) == 1.0


@pytest.mark.parametrize("answer, reward", [
    ("\\boxed{44 + 19 + 35}", 1.0), ("$\\boxed{(44 + 19) + 35}$", 1.0), ("\\boxed{44 + 19 - 35}", 0.1),
    ("\\boxed{44 + 19 + 35 = 98}", 0.0), ("\\boxed{35 \\times 1 + 44 + 19}", 0.1), ("\\boxed{}", 0.0),
])
def test_countdown_boxed_expression_inside_the_answer(answer, reward):
    ex = {"nums": [44, 19, 35], "target": 98}
    assert get_task("countdown").reward(f"<answer>\n{answer}\n</answer>", ex) == reward


def test_countdown_latex_operators():
    ex = {"nums": [6, 3, 8], "target": 16}
    assert get_task("countdown").reward("<answer>\\boxed{8 \\times 6 \\div 3}</answer>", ex) == 1.0
    assert get_task("countdown").reward("<answer>8 \\cdot 6 \\div 3</answer>", ex) == 1.0


@pytest.mark.parametrize("digits", ["１８", "١٨", "۱۸", "१८", "18\u0663"])
def test_gsm8k_numbers_are_ascii(digits):
    text = f"<reasoning>\na\n</reasoning>\n<answer>\n{digits}\n</answer>\n"
    values = get_task("gsm8k").rewards(text, {"answer": "18"})
    assert values["correctness_reward"] == 0.0 and values["int_reward"] == 0.0


@pytest.mark.parametrize("pred, ref", [
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ("\\begin{pmatrix} -1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}-1&2\\\\3&4\\end{pmatrix}"),
    ("\\begin{pmatrix} \\frac{1}{2} \\\\ 0 \\end{pmatrix}", "\\begin{pmatrix}\\dfrac12\\\\0\\end{pmatrix}"),
    ("\\\\frac{1}{2}", "\\frac{1}{2}"), ("\\\\dfrac{3}{4}", "0.75"), ("\\\\sqrt{2}", "\\sqrt2"),
])
def test_math_matrices_and_doubled_backslashes(pred, ref):
    assert is_equiv(pred, ref)


@pytest.mark.parametrize("pred, ref", [
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}12\\end{pmatrix}"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}"),
    ("\\begin{pmatrix}1&2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
])
def test_math_matrices_still_distinguished(pred, ref):
    assert not is_equiv(pred, ref)


def test_realistic_set_counts():
    counts = policy_counts()
    assert counts["gsm_open"] == 3 * len(GSM_ITEMS) and counts["gsm_open_correct"] == counts["gsm_open"]
    assert counts["gsm_open_correct_d1"] == len(GSM_ITEMS)  # d1 reads only the bare "open" form as the answer
    assert counts["cd_boxed"] == 3 * len(CD_ITEMS) and counts["cd_boxed_right"] == counts["cd_boxed"]
    assert counts["cd_boxed_right_d1"] == 0


# --------------------------------------------------------------------------------- d1's published generations


def d1_generation_counts(checkout: Path) -> dict[str, int]:
    """Counts on d1's published LLaDA generations (``eval/eval_baselines``), special-token text removed as the
    trainer's decoding removes it."""
    counts = dict.fromkeys(("gsm", "gsm_open", "gsm_open_correct", "gsm_nonascii", "cd", "cd_boxed",
                            "cd_boxed_right", "cd_boxed_right_d1"), 0)
    gsm, cd = get_task("gsm8k"), get_task("countdown")
    for path in sorted((checkout / "eval" / "eval_baselines").glob("*_generations.json")):
        rows = json.loads(path.read_text(encoding="utf-8"))["generations"]
        for row in rows:
            text = row["generations"].replace("<|eot_id|>", "").replace("<|endoftext|>", "")
            if path.name.startswith("gsm8k"):
                counts["gsm"] += 1
                truth = row["ground_truth"]
                if truth is None:
                    continue
                ex = {"answer": str(int(truth)) if float(truth).is_integer() else str(truth)}
                block = answer_block(text)
                counts["gsm_nonascii"] += any(ch.isdigit() and not ch.isascii() for ch in (block or ""))
                if block is not None and closed_answer_block(text) is None:
                    counts["gsm_open"] += 1
                    counts["gsm_open_correct"] += gsm.metric(text, ex) == 1.0
            elif path.name.startswith("countdown"):
                counts["cd"] += 1
                (nums, target) = row["ground_truth"]
                ex = {"nums": nums, "target": target}
                if "\\boxed" in (answer_block(text) or ""):
                    counts["cd_boxed"] += 1
                    counts["cd_boxed_right"] += cd.reward(text, ex) == 1.0
                    counts["cd_boxed_right_d1"] += get_task("countdown", d1_compat=True).reward(text, ex) == 1.0
    return counts


if __name__ == "__main__":
    print(json.dumps(policy_counts(), indent=1))
    if len(sys.argv) > 1:
        print(json.dumps(d1_generation_counts(Path(sys.argv[1])), indent=1))
