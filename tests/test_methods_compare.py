"""The methods' comparison: its checkpoint recipe (stp.pretrain's relabel_noise, pretrained:sudoku_relabel), the
earlier countdown_small task, the pass@k probe and a shortened run of the harness (benchmarks/methods.py) whose
accuracies are checked against an independent evaluation.

The checkpoint here is a very small model (width 32, one layer, a few SFT steps): the harness is what is tested, not
the task's difficulty (benchmarks/RESULTS.md measures that)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import methods as bm
from benchmarks import paired_gain as pg
from benchmarks.pass_at_k import pass_at_k
from stp import pretrain as pt
from stp.tasks import get_task
from stp.tasks.countdown import split_of

SMALL = dict(steps=3, batch_size=4, n_train=8, eval_examples=2, hidden_size=32, num_hidden_layers=1,
             intermediate_size=64, num_attention_heads=2)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """compare-tiny's recipe (sudoku, relabel_noise 0.6, format_noise 0) at a very small size."""
    _, recipe = pt.checkpoint_settings("pretrained:sudoku_relabel")
    return pt.pretrain("sudoku", out_dir=tmp_path_factory.mktemp("ckpt") / "sr", progress=False, **SMALL, **recipe)


def test_relabel_noise_writes_relabelled_grids_at_its_rate():
    import torch

    from stp.tasks.sudoku import valid_grid

    task = pt.compact_task("sudoku")
    train = task.load("train", source="generated", n=2000, seed=1)
    ex = train[0]
    relabelled = "".join(str(int(d) % 4 + 1) for d in ex["solution"])
    text = pt.reference_completion("sudoku", ex, relabel_noise=1.0, generator=torch.Generator().manual_seed(0))
    assert text.endswith(f"<answer>{relabelled}</answer>") and valid_grid(relabelled)
    assert task.reward(text, ex) == 0.0  # consistent but wrong: no empty cell right
    assert pt.reference_completion("sudoku", ex, relabel_noise=0.0, generator=torch.Generator()).endswith(
        f"<answer>{ex['solution']}</answer>")
    gen = torch.Generator().manual_seed(5)
    texts = [pt.reference_completion("sudoku", e, relabel_noise=0.6, generator=gen) for e in train]
    wrong = sum(task.reward(t, e) == 0.0 for t, e in zip(texts, train)) / len(train)
    assert abs(wrong - 0.6) < 4 * math.sqrt(0.24 / len(train))  # the requested rate (4 standard errors)
    assert all(t.count("<answer>") == 1 for t in texts)  # tags always kept (format_noise 0)


def test_relabel_noise_is_validated_and_part_of_the_settings_hash():
    base = pt.default_settings("sudoku")
    assert base["relabel_noise"] == 0.0
    legacy = {k: v for k, v in base.items() if k != "relabel_noise"}
    assert pt.settings_hash(base) == pt.settings_hash(legacy)  # the checkpoints made before the knob keep their hash
    task, recipe = pt.checkpoint_settings("pretrained:sudoku_relabel")
    assert (task, recipe) == ("sudoku", {"format_noise": 0.0, "relabel_noise": 0.6})
    relabel = pt.default_settings(task, **recipe)
    assert pt.settings_hash(relabel) != pt.settings_hash(pt.default_settings("sudoku", format_noise=0.0))
    assert pt.settings_hash(relabel) != pt.settings_hash(pt.default_settings("sudoku", format_noise=0.0,
                                                                             relabel_noise=0.5))
    assert pt.cached_path(task, "/c", **recipe).name == f"sudoku-{pt.settings_hash(relabel)}"
    with pytest.raises(pt.PretrainError, match=r"relabel_noise=1\.5: must be a number in \[0\.0, 1\.0\]"):
        pt.default_settings("sudoku", relabel_noise=1.5)
    with pytest.raises(pt.PretrainError, match="relabel_noise=0.3 with task='countdown'"):
        pt.default_settings("countdown", relabel_noise=0.3)
    with pytest.raises(pt.PretrainError, match="pretrained:nope: no such checkpoint"):
        pt.checkpoint_settings("pretrained:nope")
    with pytest.raises(SystemExit):
        pt.main(["--relabel-noise", "-0.1", "--out", "/nonexistent/x"])


def test_task_generates_disjoint_solvable_small_puzzles():
    task = get_task("countdown_small")
    train = task.load("train", source="generated")
    test = task.load("test", source="generated")
    assert (len(train), len(test)) == (600, 256)
    key = lambda e: (tuple(sorted(e["nums"])), e["target"])  # noqa: E731
    assert not {key(e) for e in train} & {key(e) for e in test}
    assert len({key(e) for e in test}) == 256 and len({key(e) for e in train}) == 600
    patterns = set()
    for e in train + test:
        a, b, c = e["nums"]
        assert all(1 <= v <= 12 for v in e["nums"]) and e["target"] >= 1
        assert split_of(e["nums"], e["target"], 0.3) == ("test" if e in test else "train")
        assert e["target"] in {a + b + c, a + b - c, a - b + c, a - b - c}
        patterns.add("".join(ch for ch in e["solution"] if ch in "+-"))
        good = f"<reasoning>x</reasoning>\n<answer>{e['solution']}</answer>"
        assert task.reward(good, e) == 1.0 and task.metric(good, e) == 1.0
    assert patterns == {"++", "+-", "-+", "--"}
    e = test[0]
    wrong = f"<answer>{e['nums'][0]}+{e['nums'][1]}</answer>"  # uses two of the three numbers
    assert task.reward(wrong, e) == 0.1 and task.metric(wrong, e) == 0.0
    assert task.reward("no answer", e) == 0.0
    assert task.load("test", source="generated", n=5, seed=1) != test[:5]  # the seed matters
    with pytest.raises(RuntimeError, match="no hub dataset"):
        task.load("train", source="hub")


def test_reference_completions_fit_the_canvas():
    from stp import models

    tok = models.build_tokenizer()
    task = pt.compact_task("countdown_small")
    longest = 0
    for ex in task.load("train", source="generated"):
        text = pt.reference_completion("countdown_small", ex)
        assert task.reward(text, ex) == 1.0
        longest = max(longest, len(tok(text, add_special_tokens=False)["input_ids"]))
    assert longest <= pt._max_completion_tokens("countdown_small") <= pt.DEFAULTS["countdown_small"]["gen_length"]
    assert task.prompt_text(ex) == f"countdown {' '.join(f'{n:02d}' for n in ex['nums'])} -> {ex['target']:02d}"
    assert len({len(task.prompt_text(e)) for e in task.load("test", source="generated")}) == 1  # aligned


def test_compare_presets_follow_the_rule():
    from stp.config import PRESETS, resolve

    cfg = resolve("compare-tiny")
    assert (cfg.model.name_or_path, cfg.run.task, cfg.method) == ("pretrained:sudoku_relabel", "sudoku", "stp")
    assert cfg.run.eval_examples >= 256
    assert bm.preset_for("stp", "compare-tiny") == ("compare-tiny", None)
    for method in ("d1", "elbo", "dtrpo", "diffpo"):
        assert bm.preset_for(method, "compare-tiny") == (f"{method}-compare-tiny", None)
        own = resolve(f"{method}-compare-tiny")
        assert (own.model.name_or_path, own.run.task, own.method) == (cfg.model.name_or_path, "sudoku", method)
        assert (own.grpo.learning_rate, own.grpo.max_steps) == (cfg.grpo.learning_rate, cfg.grpo.max_steps)
    assert bm.preset_for("dtrpo-online", "compare-tiny") == ("compare-tiny", "dtrpo-online")
    assert bm.preset_for("d1", "tiny") == ("d1-tiny", None)
    # A method with no preset of its own joins through --method on the base preset.
    assert bm.preset_for("elbo", "llada-gsm8k") == ("llada-gsm8k", None) or "elbo-llada-gsm8k" not in PRESETS
    with pytest.raises(ValueError, match="not a method"):
        bm.preset_for("nope", "compare-tiny")


def test_method_without_own_preset_runs_with_method_flag(monkeypatch):
    from stp.config import PRESETS

    monkeypatch.delitem(PRESETS, "elbo-compare-tiny")
    assert bm.preset_for("elbo", "compare-tiny") == ("compare-tiny", "elbo")
    spec = bm.plan(["elbo"], [3], "compare-tiny", bm.Path("w"))[0]
    cmd = spec.command(10, 5)
    assert cmd[cmd.index("--method") + 1] == "elbo" and cmd[cmd.index("--run.seed") + 1] == "3"


def test_budget_and_standard_errors():
    rows = [{"step": s, "step_seconds": 2.0, "reward_mean": 0.1 * s} for s in range(1, 7)]
    rows[2]["eval_accuracy"] = 0.25  # after step 3: 6 s
    summary = {"accuracy_before": 0.125, "accuracy_after": 0.5, "steps": 6}
    pts = bm.eval_points(rows, summary)
    assert pts == [(0.0, 0, 0.125), (6.0, 3, 0.25), (12.0, 6, 0.5)]
    assert bm.accuracy_at_budget(pts, 5.9) == (0.0, 0, 0.125)
    assert bm.accuracy_at_budget(pts, 6.0) == (6.0, 3, 0.25)
    assert bm.accuracy_at_budget(pts, 100.0) == (12.0, 6, 0.5)
    m, se = bm.accuracy_se([0.5, 0.5], 100)
    assert m == 0.5 and se == pytest.approx(0.05)  # seeds agree: the puzzles' binomial error alone
    g, gse = bm.gain_se([0.6, 0.4], [0.2, 0.2], 100)
    assert g == pytest.approx(0.3)
    assert gse == pytest.approx(math.sqrt(0.25 / 100 + 0.16 / 100 + 0.01))


def test_paired_standard_errors():
    after, before = [0.5, 1.0, 0.25, 0.75], [0.25, 0.5, 0.25, 0.5]
    g, se = pg.paired_gain(after, before)
    d = [0.25, 0.5, 0.0, 0.25]
    mean = sum(d) / 4
    assert g == pytest.approx(mean)
    assert se == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in d) / 3 / 4))
    m, s = pg.combine_seeds([(0.1, 0.01), (0.2, 0.02)])
    assert m == pytest.approx(0.15)
    assert s == pytest.approx(math.sqrt((0.01 ** 2 + 0.02 ** 2) / 4 + 0.005 / 2))
    with pytest.raises(ValueError, match="two equal lengths"):
        pg.paired_gain([1.0, 0.0], [1.0])


def test_paired_difference_of_runs_per_example(seed, tmp_path):
    """paired_difference against a direct computation on random per-example results of several seeds, and
    heldout_at reading the last line of a step from a run's heldout.jsonl."""
    gen = torch.Generator().manual_seed(seed)
    n = 37
    a = (torch.rand(3, n, generator=gen) < 0.6).double().tolist()
    b = (torch.rand(2, n, generator=gen) < 0.4).double().tolist()
    d = torch.tensor(a, dtype=torch.float64).mean(0) - torch.tensor(b, dtype=torch.float64).mean(0)
    m, se = bm.paired_difference(a, b)
    assert m == pytest.approx(float(d.mean()), abs=1e-12)
    assert se == pytest.approx(float(d.std(unbiased=True)) / math.sqrt(n), abs=1e-12)
    assert bm.paired_difference(a, [b[0][:-1]]) is None and bm.paired_difference(a, [None]) is None
    lines = [{"step": 0, "rewards": [0.1], "metrics": [None]}, {"step": 4, "rewards": [1.0], "metrics": [0.0]},
             {"step": 4, "rewards": [1.0], "metrics": [1.0]}]  # a resumed run evaluated step 4 twice: the last
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert bm.heldout_at(tmp_path, 0) == [0.0] and bm.heldout_at(tmp_path, 4) == [1.0]
    assert bm.heldout_at(tmp_path, 5) is None and bm.heldout_at(tmp_path / "none", 0) is None


def test_pass_at_k_counts_prompts_with_a_right_sample(small_checkpoint):
    from stp import models

    model = models.load(str(small_checkpoint))
    task = pt.compact_task("sudoku")
    examples = task.load("test", source="generated", n=3)
    res = pass_at_k(model, task, examples, k=2, gen_length=32, block_length=32, steps=16, temperature=0.9)
    assert res["examples"] == 3 and res["k"] == 2
    assert 0.0 <= res["greedy_accuracy"] <= 1.0 and 0.0 <= res["sampled_accuracy"] <= 1.0
    assert res["pass_at_k"] * 3 == pytest.approx(round(res["pass_at_k"] * 3))  # prompts with a fully right sample
    assert res["sampled_accuracy"] <= res["best_of_k"] <= 1.0 and res["pass_at_k"] <= res["best_of_k"]
    with pytest.raises(ValueError, match="temperature"):
        pass_at_k(model, task, examples, k=2, gen_length=32, block_length=32, steps=16, temperature=0.0)


@pytest.mark.slow
def test_short_comparison_table_and_real_accuracies(small_checkpoint, tmp_path):
    """Two methods x two seeds x 2 steps through the real command line; the table has one row per method with every
    column; the accuracies are those of the runs' summaries, and the starting accuracy equals an independent
    evaluation of the checkpoint on the same held-out puzzles; a second call reuses the finished runs."""
    from stp import models
    from stp.config import resolve
    from stp.data_order import load_data, task_for
    from stp.evaluation import evaluate

    work = tmp_path / "work"
    argv = ["--methods", "stp", "d1", "--seeds", "0", "1", "--steps", "2", "--eval-every", "1", "--eval-examples",
            "6", "--variance-prompts", "1", "--variance-repeats", "2", "--work", str(work), "--out",
            str(tmp_path / "t.md"), "--set", f"model.name_or_path={small_checkpoint}", "grpo.prompts_per_step=1",
            "grpo.num_generations=2"]
    record = bm.main(argv)
    text = (tmp_path / "t.md").read_text()
    main_part, paired_part = text.split("\n\nPaired on the same held-out examples")
    table = [ln for ln in main_part.splitlines() if ln.startswith("|")]
    assert len(table) == 2 + 2
    paired_rows = [ln for ln in paired_part.splitlines() if ln.startswith("|")]
    assert len(paired_rows) == 2 + 2 and paired_rows[3].startswith("| `d1` | - | - |")
    assert table[0].count("|") == 13 and all(ln.count("|") == 13 for ln in table)
    assert table[2].startswith("| `stp` | `compare-tiny` | 2 |") and table[3].startswith("| `d1` | `d1-compare-tiny`")
    assert (tmp_path / "t.png").stat().st_size > 1000

    cfg = resolve("compare-tiny", overrides={"run.eval_examples": 6})
    task = task_for(cfg)
    _, heldout = load_data(cfg, task)
    ev = evaluate(models.load(str(small_checkpoint)), task, heldout, gen_length=32, block_length=32, steps=16,
                  progress=False)
    for res in record["results"]:
        assert res["eval_examples"] == 6 and res["steps"] == 2
        for seed, row in zip((0, 1), res["per_seed"]):
            summary = json.loads((work / res["method"] / f"seed{seed}" / "summary.json").read_text())
            assert row["accuracy_before"] == summary["accuracy_before"] == ev["accuracy"]
            assert row["accuracy_after"] == summary["accuracy_after"]
            assert 0.0 <= row["accuracy_after"] <= 1.0
        mean_after = sum(r["accuracy_after"] for r in res["per_seed"]) / 2
        assert res["accuracy_after"][0] == pytest.approx(mean_after)
        assert res["nfe_per_sample"][0] > 0 and res["seconds_per_step"][0] > 0
        assert res["variance"] is not None and res["variance"]["variance"] >= 0
    assert record["results"][0]["variance"]["anchor_fraction"] == pytest.approx(0.05)  # stp: 1 - rho
    assert record["results"][1]["variance"]["estimator"] == "d1"

    paired = pg.main(["--work", str(work), "--methods", "stp", "d1", "--seeds", "0", "1"])
    assert not paired["notes"]  # every re-evaluation reproduced its run's summary.json
    for res in record["results"]:
        mean_gain = sum(r["accuracy_after"] - r["accuracy_before"] for r in res["per_seed"]) / 2
        assert paired["results"][res["method"]]["mean"] == pytest.approx(mean_gain)

    stamp = (work / "stp" / "seed0" / "summary.json").stat().st_mtime_ns
    again = bm.main(argv)
    assert (work / "stp" / "seed0" / "summary.json").stat().st_mtime_ns == stamp
    assert again["results"][0]["accuracy_after"] == record["results"][0]["accuracy_after"]
    with pytest.raises(RuntimeError, match="max_steps"):
        bm.main([("3" if i == argv.index("--steps") + 1 else a) for i, a in enumerate(argv)])  # other steps
    with pytest.raises(RuntimeError, match=r"grpo.learning_rate \(0.002 there, 0.0001 here\)"):
        bm.main([*argv, "grpo.learning_rate=1e-4"])  # other settings over the same finished runs
