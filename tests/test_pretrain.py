"""stp.pretrain: the SFT run, its determinism, the cache, the CLI's flag checks, the compact prompt format.

Every run here uses a very small model (width 32, one layer) and a few steps, so the file stays well under a minute
on 2 CPU cores; the default settings' quality is measured by ``python -m stp.pretrain`` itself (pretrain.json).
"""

import json

import pytest
import torch

from stp import models
from stp import pretrain as pt
from stp.eval import evaluate
from stp.tasks import get_task

SMALL = dict(steps=3, batch_size=4, n_train=8, eval_examples=2, hidden_size=32, num_hidden_layers=1,
             intermediate_size=64, num_attention_heads=2)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("name", ["sudoku", "countdown"])
def test_reference_completions_score_full_reward_and_fit(name):
    task = pt.compact_task(name)
    tok = models.build_tokenizer()
    gen_length = pt.DEFAULTS[name]["gen_length"]
    for ex in task.load("train", source="generated", n=50, seed=3):
        text = pt.reference_completion(name, ex)
        assert text.startswith("<reasoning>") and "</reasoning>\n<answer>" in text and text.endswith("</answer>")
        assert task.reward(text, ex) == 1.0
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        assert n <= pt._max_completion_tokens(name) <= gen_length
        prompt = task.format_prompt(ex, tok)
        assert prompt == f"<|user|>\n{pt.compact_prompt(name, ex)}<|eos|>\n<|assistant|>\n"
        assert len(tok(prompt, add_special_tokens=False)["input_ids"]) < 40  # vs ~500 with d1's prompt
    assert get_task(name).prompt_text(ex) != task.prompt_text(ex)  # the task itself is untouched


def test_answer_noise_corrupts_only_empty_cells():
    ex = get_task("sudoku").load("train", source="generated", n=1, seed=0)[0]
    gen = torch.Generator().manual_seed(0)
    text = pt.reference_completion("sudoku", ex, answer_noise=1.0, generator=gen)
    grid = text.split("<answer>")[1].split("</answer>")[0]
    assert all(grid[i] == ex["puzzle"][i] for i in range(16) if ex["puzzle"][i] != "0")


def test_format_noise_mixes_formats_at_equal_length():
    """format_noise writes the answer between newlines (no reward) instead of the tags, keeping every token position;
    the fraction follows the setting; the reward reads only the tagged form."""
    from stp.tasks.sudoku import sudoku_reward

    tok = models.build_tiny(0).tokenizer
    examples = get_task("sudoku").load("train", source="generated", n=400, seed=3)
    gen = torch.Generator().manual_seed(5)
    texts = [pt.reference_completion("sudoku", ex, format_noise=0.3, generator=gen) for ex in examples]
    bare = [("<answer>" not in t) for t in texts]
    assert 0.22 < sum(bare) / len(bare) < 0.38
    for ex, text, is_bare in zip(examples, texts, bare):
        tagged = pt.reference_completion("sudoku", ex)
        assert len(tok(text, add_special_tokens=False)["input_ids"]) == len(tok(tagged, add_special_tokens=False)
                                                                            ["input_ids"])
        assert sudoku_reward(text, ex) == (0.0 if is_bare else 1.0)
        if is_bare:
            assert text == tagged.replace("<answer>", "\n").replace("</answer>", "\n")
    # format_noise 0 draws nothing: the other noise streams stay as they were
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert pt.reference_completion("sudoku", examples[0], answer_noise=0.5, generator=g1) == \
        pt.reference_completion("sudoku", examples[0], answer_noise=0.5, format_noise=0.0, generator=g2)
    with pytest.raises(pt.PretrainError, match="format_noise=1.5: must be a number in"):
        pt.default_settings("sudoku", format_noise=1.5)


def test_loss_decreases_on_a_fixed_batch():
    model = models.build_tiny(0, hidden_size=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
                              num_key_value_heads=2)
    examples = get_task("sudoku").load("train", source="generated", n=8, seed=0)
    batch = pt.make_batch(model, "sudoku", examples, 32)
    assert batch["completion"].shape == (8, 32) and (batch["completion"][:, -1] == model.eos_token_id).all()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(25):
        loss = pt.sft_loss(model, batch, torch.Generator().manual_seed(0))  # same masks every step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.slow
def test_cli_run_writes_a_checkpoint_that_loads_and_generates(tmp_path, capsys):
    out = tmp_path / "ckpt"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    assert pt.main(["--out", str(out), "--no-progress", *flags]) == 0
    assert "held-out" in capsys.readouterr().out
    info = json.loads((out / "pretrain.json").read_text())
    assert info["settings"]["steps"] == 3 and info["settings_hash"] == pt.settings_hash(info["settings"])
    assert info["eval"]["before"] is not None and info["eval"]["after"] is not None
    assert info["command"].startswith("python -m stp.pretrain --steps 3")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left

    model = models.load(str(out))
    assert model.family == "tiny" and model.mask_token_id == model.tokenizer.mask_token_id
    task = pt.compact_task("sudoku")
    examples = task.load("test", source="generated", n=2, seed=0)
    res = evaluate(model, task, examples, gen_length=32, block_length=32, steps=16, batch_size=2, progress=False)
    assert res["n"] == 2 and all(isinstance(r["completion"], str) for r in res["records"])

    with pytest.raises(SystemExit) as e:  # a non-empty --out is refused without --overwrite
        pt.main(["--out", str(out), *flags])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_countdown_run_with_left_padded_prompts(tmp_path):
    path = pt.pretrain("countdown", out_dir=tmp_path / "cd", progress=False, **SMALL)
    info = json.loads((path / "pretrain.json").read_text())
    assert info["settings"]["gen_length"] == 64 and info["eval"]["after"]["eos_rate"] >= 0.0
    assert models.load(str(path)).vocab_size == models.build_tokenizer().__len__()


@pytest.mark.slow
def test_same_seed_same_weights_and_no_global_rng(tmp_path):
    state = torch.random.get_rng_state()
    settings = {**SMALL, "eval_examples": 0}
    a = pt.pretrain("sudoku", out_dir=tmp_path / "a", progress=False, **settings)
    b = pt.pretrain("sudoku", out_dir=tmp_path / "b", progress=False, **settings)
    c = pt.pretrain("sudoku", out_dir=tmp_path / "c", progress=False, **{**settings, "seed": 1})
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_ensure_pretrained_builds_once_then_uses_the_cache(tmp_path, monkeypatch):
    settings = {**SMALL, "eval_examples": 0}
    path = pt.ensure_pretrained("sudoku", cache_dir=tmp_path, progress=False, **settings)
    assert path.parent == tmp_path and path.name.startswith("sudoku-")
    assert path == pt.cached_path("sudoku", tmp_path, **settings)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # built in a temporary directory, renamed

    def fail(*args, **kwargs):
        raise AssertionError("pretrain must not run again")

    monkeypatch.setattr(pt, "pretrain", fail)
    assert pt.ensure_pretrained("sudoku", cache_dir=tmp_path, progress=False, **settings) == path
    # other settings -> another directory (and here: a build, which the patch turns into a failure)
    with pytest.raises(AssertionError, match="must not run again"):
        pt.ensure_pretrained("sudoku", cache_dir=tmp_path, progress=False, **{**settings, "seed": 5})
    # an incomplete directory at the cache path is not trusted
    (path / "pretrain.json").unlink()
    with pytest.raises(AssertionError, match="must not run again"):
        pt.ensure_pretrained("sudoku", cache_dir=tmp_path, progress=False, **settings)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("STP_CACHE_DIR", str(tmp_path))
    assert pt.default_cache_dir() == tmp_path / "pretrained"
    assert pt.cached_path("sudoku").parent == tmp_path / "pretrained"


@pytest.mark.parametrize("argv, needle", [
    (["--task", "gsm8k"], "--task"),
    (["--steps", "0"], "--steps=0"),
    (["--batch-size", "-2"], "--batch-size=-2"),
    (["--lr", "0"], "--lr=0.0"),
    (["--lr", "nan"], "--lr=nan"),
    (["--answer-noise", "1.5"], "--answer-noise=1.5"),
    (["--gen-length", "48"], "--gen-length=48 is not a multiple of --block-length=32"),
    (["--gen-length", "16", "--block-length", "16"], "--gen-length=16: sudoku reference completions need"),
    (["--hidden-size", "30", "--num-attention-heads", "4"], "--hidden-size=30"),
    (["--steps", "many"], "invalid int value"),
])
def test_bad_flags_fail_before_any_work(argv, needle, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(pt, "pretrain", lambda *a, **k: pytest.fail("pretrain ran despite a bad flag"))
    with pytest.raises(SystemExit) as e:
        pt.main([*argv, "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_bad_settings_in_the_library():
    with pytest.raises(pt.PretrainError, match="unknown setting"):
        pt.default_settings("sudoku", stepz=3)
    with pytest.raises(pt.PretrainError, match="task='gsm8k'"):
        pt.default_settings("gsm8k")
    with pytest.raises(pt.PretrainError, match="steps=1.5"):
        pt.pretrain("sudoku", out_dir="/nonexistent/never", steps=1.5)
