"""stp.tasks.chain: the generator, the split, the reward, the reference completions and the checkpoint name."""

import json

import pytest

from stp import models
from stp import pretrain as pt
from stp.tasks import DataError, get_task
from stp.tasks import chain as ch


def _reference_answer(start: int, ops: str) -> int:
    # Independent of run_chain: the signed sum of all operands at once, then mod 10.
    total = start + sum(int(ops[i + 1]) * (1 if ops[i] == "+" else -1) for i in range(0, len(ops), 2))
    return total % 10


def test_generator_is_deterministic_and_answers_match_an_independent_sum():
    a = ch.generate(50, "train", seed=4)
    assert a == ch.generate(50, "train", seed=4)
    assert a != ch.generate(50, "train", seed=5)
    for ex in a:
        assert len(ex["ops"]) == 2 * ch.N_STEPS and 0 <= ex["start"] <= 9
        assert ex["answer"] == _reference_answer(ex["start"], ex["ops"])
        assert ch.run_chain(ex["start"], ex["ops"])[-1] == ex["answer"]


def test_splits_are_disjoint_whatever_the_seeds_and_follow_the_hash():
    train = [(e["start"], e["ops"]) for s in (0, 1) for e in ch.generate(300, "train", seed=s)]
    test = [(e["start"], e["ops"]) for s in (0, 1) for e in ch.generate(300, "test", seed=s)]
    assert not set(train) & set(test)
    assert all(ch.split_of(*k) == "train" for k in train) and all(ch.split_of(*k) == "test" for k in test)
    assert len(set(test[:300])) == 300 and len(set(train[:300])) == 300  # distinct within a split
    # the hash puts about TEST_FRACTION of all puzzles in test
    import random

    rng = random.Random(7)
    keys = [(rng.randint(0, 9), "".join(rng.choice("+-") + str(rng.randint(1, 9)) for _ in range(4)))
            for _ in range(4000)]
    share = sum(ch.split_of(*k) == "test" for k in keys) / len(keys)
    assert abs(share - ch.TEST_FRACTION) < 0.03


def test_reward_on_hand_made_completions():
    task = get_task("chain")
    ex = {"start": 3, "ops": "+7-4+9", "answer": 5}
    right = "<reasoning>3\n+7=0\n-4=6\n+9=5\n</reasoning>\n<answer>5</answer>"
    assert task.reward(right, ex) == 1.0 and task.metric(right, ex) == 1.0
    wrong = right.replace("<answer>5", "<answer>4")
    assert task.reward(wrong, ex) == 0.1 and task.metric(wrong, ex) == 0.0
    for bad in ("<reasoning>3\n+7=0\n</reasoning>\n\n5\n",   # no answer tags
                "<answer>55</answer>", "<answer>five</answer>", "<answer></answer>", "5", ""):
        assert task.reward(bad, ex) == 0.0, bad
    # the reward reads the answer only: a wrong chain with the right digit still scores (stated in the module)
    assert task.reward("<reasoning>3\n+7=1\n</reasoning>\n<answer>5</answer>", ex) == 1.0
    # without a stored answer it is recomputed
    assert task.reward(right, {"start": 3, "ops": "+7-4+9"}) == 1.0


def test_reference_completion_scores_one_fits_and_keeps_the_prompt_stride():
    task = pt.compact_task("chain")
    tok = models.build_tokenizer()
    for ex in task.load("test", source="generated", n=20):
        text = pt.reference_completion("chain", ex)
        assert task.reward(text, ex) == 1.0
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == pt._max_completion_tokens("chain") <= pt.DEFAULTS["chain"]["gen_length"]
        prompt = tok(task.format_prompt(ex, tok), add_special_tokens=False)["input_ids"]
        seq = prompt + ids
        # operand k sits at one fixed distance from the line of the reasoning that copies it (the design)
        assert tok.decode(prompt).startswith("<|user|>\nchain ")
        offsets = set()
        for k in range(ch.N_STEPS):
            p_pos = 2 + len(f"chain {ex['start']}\n") + 5 * k + 1   # the operand in '<|user|>', '\n', 'chain s\n'
            c_pos = len(prompt) + 1 + 2 + 5 * k + 1                  # '<reasoning>', 's\n', then the lines
            assert seq[p_pos] == seq[c_pos] == tok.convert_tokens_to_ids(ex["ops"][2 * k + 1])
            offsets.add(c_pos - p_pos)
        assert len(offsets) == 1


def test_parse_row_checks_fields(tmp_path):
    task = get_task("chain")
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"start": 3, "ops": "+7-4"}) + "\n" + json.dumps({"start": "4", "ops": "-1"}) + "\n")
    rows = task.load("test", data_path=path)
    assert [(r["start"], r["answer"]) for r in rows] == [(3, 6), (4, 3)]
    for row, field in (({"start": 3, "ops": "+7*4"}, "ops"), ({"start": 12, "ops": "+7"}, "start"),
                       ({"start": 3, "ops": "+0"}, "ops"), ({"start": 3, "ops": "+7", "answer": 1}, "answer")):
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(DataError, match=f"c.jsonl:1: field '{field}'"):
            task.load("test", data_path=path)


def test_checkpoint_name_resolves_and_presets_use_it():
    from stp.config import resolve

    assert pt.checkpoint_settings("pretrained:chain") == ("chain", {})
    path = pt.cached_path("chain", "/nonexistent-cache")
    assert path.name.startswith("chain-") and str(path).startswith("/nonexistent-cache")
    for preset in ("chain-tiny", "d1-chain-tiny", "elbo-chain-tiny", "diffpo-chain-tiny", "dtrpo-chain-tiny"):
        cfg = resolve(preset=preset)
        assert cfg.model.name_or_path == "pretrained:chain" and cfg.run.task == "chain"
        assert (cfg.rollout.gen_length, cfg.rollout.block_length) == (pt.DEFAULTS["chain"]["gen_length"],
                                                                      pt.DEFAULTS["chain"]["block_length"])


@pytest.mark.slow
def test_a_small_chain_pretrain_builds_through_the_cache(tmp_path):
    small = dict(steps=2, batch_size=2, n_train=4, eval_examples=0, hidden_size=32, num_hidden_layers=1,
                 intermediate_size=64, num_attention_heads=2)
    path = pt.ensure_pretrained("chain", tmp_path, progress=False, **small)
    info = json.loads((path / pt.INFO_FILE).read_text())
    assert info["settings"]["task"] == "chain" and info["settings"]["gen_length"] == 128
    assert info["example_completion"].startswith("<reasoning>") and info["command"].startswith(
        "python -m stp.pretrain --task chain")
    assert pt.ensure_pretrained("chain", tmp_path, progress=False, **small) == path  # cached


def test_answer_noise_writes_a_wrong_final_digit_and_keeps_the_chain():
    import torch

    task = get_task("chain")
    gen = torch.Generator().manual_seed(0)
    for ex in ch.generate(20, "train", seed=2):
        clean = pt.reference_completion("chain", ex)
        noisy = pt.reference_completion("chain", ex, answer_noise=1.0, generator=gen)
        assert task.reward(noisy, ex) == 0.1
        assert noisy.split("</reasoning>")[0] == clean.split("</reasoning>")[0]


@pytest.mark.parametrize("module", ["stp.tasks.chain", "stp.tasks.prompts", "benchmarks.train_step_phases",
                                    "benchmarks.chain_measures", "benchmarks.rollout_engine"])
def test_doctests(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0, module


def test_benchmark_summary_lines_keep_engine_and_method_apart():
    from benchmarks.chain_measures import paired
    from benchmarks.train_step_phases import ratio_lines

    # every (method, cache) median; the engine line divides within a method, the method line within a cache
    med = {("stp", "none"): 9.0, ("stp", "dual"): 3.0, ("d1", "none"): 12.0, ("d1", "dual"): 2.0,
           ("elbo", "none"): 6.0, ("elbo", "dual"): 4.0}
    lines = ratio_lines({k: {"total": [v * 0.9, v, v * 1.5]} for k, v in med.items()}, ["stp", "d1", "elbo"],
                        ["none", "dual"])
    assert "stp: cache dual/none = 0.33x" in lines and "d1: cache dual/none = 0.17x" in lines
    assert "step d1/stp (cache dual) = 0.67x" in lines and "step d1/stp (cache none) = 1.33x" in lines
    assert "step d1/elbo (cache dual) = 0.50x" in lines and not any("d1/d1" in ln for ln in lines)
    # paired: the standard error of the per-item differences, not of either list
    a, b = [0.0, 1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0, 1.0]
    m, se = paired(a, b)
    assert m == pytest.approx(0.2) and se == pytest.approx((0.2 * 0.8 * 5 / 4) ** 0.5 / 5 ** 0.5)
    with pytest.raises(ValueError, match="equally long"):
        paired([1.0], [1.0, 2.0])


def test_length_curriculum_schedule_and_short_batches():
    """The curriculum's lengths: the held lengths first, then growing one operation per curriculum_grow steps, then
    full-length batches (None: the ordinary ones) about half the time; a short batch holds reference completions of
    train-split chains of one length in a canvas of exactly their length, behind their compact prompts."""
    from stp.models import build_tiny

    s = pt.default_settings("chain", curriculum_hold=10, curriculum_grow=2)
    tok = build_tiny(0, hidden_size=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2).tokenizer
    cur = pt._ChainCurriculum(tok, pt.compact_task("chain"), s)
    lo, held, full = cur.SHORTEST, cur.HELD, ch.N_STEPS
    assert all(lo <= cur.length(t) <= held for t in range(10))
    assert all(lo <= cur.length(10 + 2 * k) <= min(held + k, full) for k in range(full - held))
    late = [cur.length(10 + 2 * (full - held) + t) for t in range(400)]
    share_full = sum(n == full for n in late) / len(late)
    assert abs(share_full - 0.5) < 4 * (0.25 / len(late)) ** 0.5 and set(late) - {full} <= set(range(lo, full))
    batch = cur.batch(0, 5)
    n_ops = None
    for r in range(5):
        text = tok.decode(batch["completion"][r].tolist())
        lines = text.split("</reasoning>")[0].split("\n")[1:-1]
        n_ops = len(lines) if n_ops is None else n_ops
        assert len(lines) == n_ops and lo <= n_ops <= held  # one length per batch
        assert batch["completion"].shape[1] == 5 * n_ops + 8 and text.endswith("</answer>")  # no padding
        prompt = tok.decode(batch["prompt_ids"][r][batch["prompt_mask"][r].bool()].tolist())
        start = int(prompt.split("chain ")[1][0])
        ops = "".join(ln[:2] for ln in lines)
        assert ch.split_of(start, ops) == "train"
        assert text == pt.reference_completion("chain", {"start": start, "ops": ops})
        assert text.split("<answer>")[1][0] == str(_reference_answer(start, ops))
    with pytest.raises(pt.PretrainError, match="curriculum_hold=5, curriculum_grow=1 with task='sudoku'"):
        pt.default_settings("sudoku", curriculum_hold=5, curriculum_grow=1)
    with pytest.raises(pt.PretrainError, match="curriculum_grow=0 with curriculum_hold=5"):
        pt.default_settings("chain", curriculum_hold=5, curriculum_grow=0)
    base = pt.default_settings("sudoku")
    legacy = {k: v for k, v in base.items() if not k.startswith("curriculum_")}
    assert pt.settings_hash(base) == pt.settings_hash(legacy)  # checkpoints made before the knob keep their hash


@pytest.mark.slow
def test_decoders_table_pairs_every_rule_against_fixed_k(tmp_path):
    """benchmarks.chain_measures decoders on a small random model: one row per decoder, the reference row without
    differences, fixed-k's NFE = its steps, and the paired columns computed from the same chains."""
    from benchmarks import chain_measures as cm
    from stp.models import build_tiny

    build_tiny(0, hidden_size=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
               num_key_value_heads=2).save(tmp_path / "m")
    text = cm.main(["decoders", "--model", str(tmp_path / "m"), "--examples", "3"])
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| decoder")]
    assert [r.split(" | ")[0][2:] for r in rows] == [name for name, _ in cm.decoder_rows()]
    ref = rows[0].split(" | ")
    assert ref[3] == ref[4] == "-" and float(ref[7]) == 64.0
    assert float(rows[1].split(" | ")[7]) == 32.0 and float(rows[2].split(" | ")[7]) == 16.0
    for r in rows[1:]:
        cells = r.split(" | ")
        acc_ref, acc = float(ref[1].split()[0]), float(cells[1].split()[0])
        assert float(cells[3].split()[0]) == pytest.approx(acc - acc_ref, abs=1e-4)
