"""stp.eval end to end on the embedded tiny model (random weights: structure is checked, not accuracy)."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import stp.models  # noqa: E402
import stp.sampler  # noqa: E402
from stp import eval as stp_eval  # noqa: E402
from stp.eval import EvalError, EvalWarning, ResumeError, evaluate, main, summary_path  # noqa: E402
from stp.tasks import get_task  # noqa: E402

# Small and fast: one block of 32, 16 steps, prompts cut to 64 tokens (the char-level prompts are ~500 tokens). The
# CLI tests read the chat prompt (the tiny model's default is the compact one: tested on its own below).
GEN = dict(gen_length=32, block_length=32, steps=16, max_prompt_length=64)
CLI_GEN = ["--gen-length", "32", "--block-length", "32", "--steps", "16", "--max-prompt-length", "64",
           "--prompt-format", "chat"]
ROW_KEYS = {"index", "id", "settings_hash", "settings", "example_sha", "example", "prompt", "prompt_tokens",
            "prompt_truncated", "completion", "completion_tokens", "hit_eos", "answer", "metric", "rewards", "reward",
            "nfe"}


@pytest.fixture(scope="module")
def tiny():
    return stp.models.load("tiny")


@pytest.fixture(scope="module")
def countdown():
    task = get_task("countdown")
    return task, task.load("test", source="generated", n=3)


def read_rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def no_generate(*args, **kwargs):
    raise AssertionError("generate must not be called")


def no_load(*args, **kwargs):
    raise AssertionError("the model must not be loaded")


class CountingGenerate:
    def __init__(self):
        self.calls, self.rows, self.real = 0, 0, stp.sampler.generate

    def __call__(self, model, prompt_ids, **kwargs):
        self.calls += 1
        self.rows += prompt_ids.shape[0]
        return self.real(model, prompt_ids, **kwargs)


def check_rows(rows, task, n, gen_length=32):
    assert sorted(r["index"] for r in rows) == list(range(n))
    reward_names = {fn.__name__ for fn in task.reward_functions}
    for row in rows:
        assert set(row) >= ROW_KEYS
        assert isinstance(row["completion"], str) and "<|mask|>" not in row["completion"]
        assert 0 <= row["completion_tokens"] <= gen_length and isinstance(row["hit_eos"], bool)
        assert 0.0 <= row["metric"] <= 1.0
        assert set(row["rewards"]) == reward_names
        assert row["reward"] == pytest.approx(sum(row["rewards"].values()))
        assert row["nfe"] == 16
        assert row["settings"]["gen_length"] == gen_length and row["settings"]["task"] == task.name
        assert row["prompt_truncated"] == (row["prompt_tokens"] > row["settings"]["max_prompt_length"] > 0)


# ------------------------------------------------------------------------------------------------------------- CLI


def test_cli_end_to_end_default_output(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "tiny", "--task", "countdown", "--source", "generated", "--limit", "3", *CLI_GEN,
            "--batch-size", "2", "--no-progress", "--device", "cpu"]
    with pytest.warns(EvalWarning, match="3 of 3 prompts .* truncated from the left"):
        assert main(argv) == 0
    out = tmp_path / "eval_outputs" / "countdown_32_tiny.jsonl"
    rows = read_rows(out)
    assert len(rows) == 3
    check_rows(rows, get_task("countdown"), 3)
    assert rows[0]["settings"]["model"] == "tiny" and rows[0]["settings"]["split"] == "test"
    summary = json.loads(summary_path(out).read_text())
    assert summary_path(out).name == "countdown_32_tiny.summary.json"
    assert summary["n"] == 3 and summary["n_generated"] == 3 and summary["n_resumed"] == 0
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["seconds"] >= 0
    assert summary["settings"]["steps"] == 16 and summary["n_prompt_truncated"] == 3
    assert summary["n_answered"] == sum(r["answer"] is not None for r in rows)
    assert summary["answer_rate"] == pytest.approx(summary["n_answered"] / 3)
    stdout = capsys.readouterr().out
    assert "accuracy" in stdout and str(out.relative_to(tmp_path)) in stdout
    assert "model tiny, no adapter" in stdout and f"answered {summary['n_answered']} / 3" in stdout

    # Second run: nothing to do, so neither the model is loaded nor generate called; each example stays once.
    monkeypatch.setattr(stp.models, "load", no_load)
    monkeypatch.setattr(stp.sampler, "generate", no_generate)
    assert main(argv) == 0
    assert [r["index"] for r in read_rows(out)] == [0, 1, 2]
    assert json.loads(summary_path(out).read_text())["n_resumed"] == 3
    assert "3 resumed" in capsys.readouterr().out


def test_cli_sudoku_with_data_file(tmp_path, capsys):
    task = get_task("sudoku")
    data = tmp_path / "sudoku.jsonl"
    data.write_text("".join(json.dumps(ex) + "\n" for ex in task.load("test", source="generated", n=2)))
    out = tmp_path / "sudoku.jsonl.out"
    argv = ["--model", "tiny", "--task", "sudoku", "--data", str(data), *CLI_GEN, "--output", str(out),
            "--no-progress"]
    with pytest.warns(EvalWarning):
        assert main(argv) == 0
    rows = read_rows(out)
    check_rows(rows, task, 2)
    assert rows[0]["settings"]["data"] == str(data) and rows[0]["settings"]["source"] == "file"
    assert summary_path(out).name == "sudoku.jsonl.out.summary.json"


@pytest.mark.parametrize("extra, needle", [
    (["--gen-length", "100"], "--gen-length=100 is not a multiple of --block-length=32"),
    (["--gen-length", "64", "--steps", "3"], "--steps=3 is not a multiple of the number of blocks"),
    (["--gen-length", "64", "--block-length", "0"], "--block-length=0: must be a positive integer"),
    (["--task", "mbpp"], "--task 'mbpp': unknown task; allowed: gsm8k, math, countdown, sudoku"),
    (["--split", "dev"], "--split 'dev': unknown split for countdown; allowed: train, test"),
    (["--dtype", "fp8"], "--dtype 'fp8': allowed: auto, bfloat16, float16, float32"),
    (["--max-prompt-length", "-1"], "--max-prompt-length=-1"),
    (["--batch-size", "0"], "--batch-size=0"),
    (["--limit", "0"], "--limit 0"),
    (["--temperature", "-1"], "--temperature=-1.0"),
    (["--data", "/nonexistent/file.jsonl"], "--data '/nonexistent/file.jsonl': no such file"),
    (["--task", "gsm8k", "--prompt-format", "compact"], "--prompt-format compact with --task 'gsm8k'"),
    (["--adapter", "/nonexistent/adapter"], "--adapter '/nonexistent/adapter': no adapter_config.json"),
])
def test_cli_bad_flags_fail_before_loading(extra, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(stp.models, "load", no_load)
    monkeypatch.setattr(stp.sampler, "generate", no_generate)
    argv = ["--model", "tiny", "--task", "countdown", "--source", "generated", "--limit", "2",
            "--output", str(tmp_path / "o.jsonl")]
    # later flags win: the bad value overrides the valid default
    if "--limit" in extra:
        argv = argv[:argv.index("--limit")] + argv[argv.index("--limit") + 2:]
    if "--data" in extra:
        argv = [a for a in argv if a not in ("--source", "generated")]
    with pytest.raises(SystemExit) as exc:
        main(argv + extra)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_settings_mismatch_before_loading(tiny, tmp_path, monkeypatch, capsys, countdown):
    task, examples = countdown
    out = tmp_path / "r.jsonl"
    with pytest.warns(EvalWarning):
        evaluate(tiny, task, examples[:1], output=out, progress=False,
                 identity={"model": "tiny", "dtype": "auto", "split": "test", "source": "generated", "data": None,
                           "data_seed": 0}, **GEN)
    monkeypatch.setattr(stp.models, "load", no_load)
    before = out.read_bytes()
    with pytest.raises(SystemExit) as exc:
        main(["--model", "tiny", "--task", "countdown", "--source", "generated", "--limit", "3", "--gen-length",
              "32", "--steps", "32", "--max-prompt-length", "64", "--prompt-format", "chat", "--output", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "'steps': file has 16, this run 32" in err
    assert out.read_bytes() == before


def _lora_adapter(tmp_path):
    """A saved LoRA adapter of the tiny model with non-zero B (peft starts B at 0: the merge would be a no-op),
    and the peft-wrapped model it came from."""
    from peft import LoraConfig, get_peft_model

    lm = stp.models.load("tiny")
    torch.manual_seed(0)
    peft_model = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                         "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    lm.model = peft_model
    return tmp_path / "adapter", lm


def test_merge_adapter_matches_the_peft_model(tmp_path):
    adapter, wrapped = _lora_adapter(tmp_path)
    ids = torch.randint(0, wrapped.lm_head_weight.shape[0], (2, 12), generator=torch.Generator().manual_seed(1))
    ids[:, 6:] = wrapped.mask_token_id
    with torch.no_grad():
        expected = wrapped.logits(ids).double()
        base = stp.models.load("tiny")
        plain = base.logits(ids).double()
        merged = stp.models.merge_adapter(base, adapter)
        got = merged.logits(ids).double()
    assert (expected - plain).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert isinstance(merged.model, type(stp.models.load("tiny").model))  # plain transformers model again
    with pytest.raises(ValueError, match="no adapter_config.json"):
        stp.models.merge_adapter(stp.models.load("tiny"), tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        stp.models.merge_adapter(stp.models.load("tiny"), tmp_path / "bin")


def test_default_output_names_model_and_adapter(tmp_path, monkeypatch):
    """Another model, the same base with an adapter, or another run's adapter (every run names it 'adapter') each
    get their own default results file; the same command gets the same file back (resume)."""
    monkeypatch.chdir(tmp_path)
    for run in ("a", "b"):
        (tmp_path / "runs" / run / "adapter").mkdir(parents=True)
    names = [stp_eval.default_output("sudoku", 32, "tiny"),
             stp_eval.default_output("sudoku", 32, "pretrained:sudoku"),
             stp_eval.default_output("sudoku", 32, "tiny", "runs/a/adapter"),
             stp_eval.default_output("sudoku", 32, "tiny", "runs/b/adapter"),
             stp_eval.default_output("sudoku", 32, "GSAI-ML/LLaDA-8B-Instruct"),
             stp_eval.default_output("sudoku", 64, "tiny")]
    assert len(set(names)) == len(names), names
    assert all(n.parent == Path("eval_outputs") and "/" not in n.name for n in names)
    assert "a-adapter" in names[2].name and names[2].name.startswith("sudoku_32_tiny+")
    assert stp_eval.default_output("sudoku", 32, "tiny", str(tmp_path / "runs" / "a" / "adapter")) == names[2]


@pytest.mark.slow
def test_cli_second_model_with_default_output(tmp_path, monkeypatch, capsys):
    """Evaluating the base and then base + adapter with the default --output: both run (the second used to refuse,
    the file holding the first one's settings), each into its own file, and the printed line names the adapter."""
    adapter, _ = _lora_adapter(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "tiny", "--task", "sudoku", "--source", "generated", "--limit", "2", "--gen-length", "32",
            "--block-length", "32", "--steps", "16", "--no-progress"]
    assert main(argv) == 0
    assert "model tiny, no adapter" in capsys.readouterr().out
    assert main(argv + ["--adapter", str(adapter)]) == 0
    stdout = capsys.readouterr().out
    assert f"model tiny + adapter {adapter}" in stdout
    files = sorted(p.name for p in (tmp_path / "eval_outputs").glob("*.jsonl"))
    assert len(files) == 2 and "sudoku_32_tiny.jsonl" in files, files
    with_adapter = next(f for f in files if f != "sudoku_32_tiny.jsonl")
    assert [r["settings"]["adapter"].split("@")[0] for r in read_rows(tmp_path / "eval_outputs" / with_adapter)] \
        == [str(adapter)] * 2


@pytest.mark.slow
def test_cli_adapter_and_compact_prompt(tmp_path, capsys):
    """--adapter merges the trainer's adapter; the tiny model reads the compact prompt by default; the rows equal
    evaluate() on the merged model in memory."""
    from stp.pretrain import compact_task

    adapter, _ = _lora_adapter(tmp_path)
    out = tmp_path / "r.jsonl"
    assert main(["--model", "tiny", "--adapter", str(adapter), "--task", "sudoku", "--source", "generated",
                 "--limit", "3", "--gen-length", "32", "--block-length", "32", "--steps", "16", "--output", str(out),
                 "--no-progress"]) == 0
    rows = read_rows(out)
    task = compact_task("sudoku")
    check_rows(rows, task, 3)
    assert rows[0]["prompt"].startswith("<|user|>\nsudoku ") and not any(r["prompt_truncated"] for r in rows)
    assert rows[0]["settings"]["prompt_format"] == "compact"
    assert rows[0]["settings"]["adapter"].startswith(f"{adapter}@")
    merged = stp.models.merge_adapter(stp.models.load("tiny"), adapter)
    examples = task.load("test", source="generated", n=3)
    ref = evaluate(merged, task, examples, gen_length=32, block_length=32, steps=16, progress=False)
    assert [r["completion"] for r in rows] == [r["completion"] for r in ref["records"]]
    plain = evaluate(stp.models.load("tiny"), task, examples, gen_length=32, block_length=32, steps=16,
                     progress=False)
    assert [r["completion"] for r in plain["records"]] != [r["completion"] for r in ref["records"]]


# ------------------------------------------------------------------------------------------------------- library


def test_evaluate_in_memory(tiny):
    task = get_task("sudoku")
    examples = task.load("test", source="generated", n=3)
    tiny.train()  # a trainer's model: evaluate switches to eval mode and restores the mode afterwards
    with pytest.warns(EvalWarning, match="truncated"):
        result = evaluate(tiny, task, examples, batch_size=2, progress=False, **GEN)
    assert tiny.training
    tiny.eval()
    assert result["n"] == 3 and result["n_generated"] == 3 and result["output"] is None
    assert 0.0 <= result["accuracy"] <= 1.0 and result["mean_nfe"] == 16
    assert set(result["mean_rewards"]) == {"sudoku_reward"}
    assert result["settings"]["model"] == "tiny" and result["settings"]["dtype"] == "float32"
    check_rows(result["records"], task, 3)


def test_evaluate_steps_default_and_bad_args(tiny, countdown, monkeypatch):
    task, examples = countdown
    monkeypatch.setattr(stp.sampler, "generate", no_generate)
    with pytest.raises(EvalError, match="gen_length=100 is not a multiple of block_length=32"):
        evaluate(tiny, task, examples, gen_length=100)
    with pytest.raises(EvalError, match="steps=5 is not a multiple"):
        evaluate(tiny, task, examples, gen_length=64, steps=5)


def test_decoding_stops_at_eos_and_scores(tiny, countdown, monkeypatch):
    """A fake generate returns the right answer, EOS, then junk: decoded up to EOS, scored 1.0."""
    task, examples = countdown
    tok = tiny.tokenizer
    seen = {}

    def fake_generate(model, prompt_ids, *, attention_mask, gen_length, sample_ids, **kwargs):
        seen.update(prompt_ids=prompt_ids, attention_mask=attention_mask, sample_ids=sample_ids.tolist())
        rows = []
        for i in sample_ids.tolist():
            text = f"<reasoning>\nok\n</reasoning>\n<answer>\n{examples[i]['solution']}\n</answer>"
            ids = tok(text, add_special_tokens=False)["input_ids"] + [tiny.eos_token_id]
            ids += [tok.convert_tokens_to_ids("7")] * (gen_length - len(ids))
            rows.append(ids[:gen_length])
        return SimpleNamespace(completions=torch.tensor(rows), nfe=torch.full((len(rows),), 5))

    monkeypatch.setattr(stp.sampler, "generate", fake_generate)
    result = evaluate(tiny, task, examples, gen_length=64, block_length=32, steps=32, max_prompt_length=0,
                      batch_size=3, progress=False)
    assert result["accuracy"] == 1.0 and result["n_prompt_truncated"] == 0
    for row, ex in zip(result["records"], examples):
        assert row["completion"].endswith("</answer>") and "7" not in row["completion"].split("</answer>")[-1]
        assert row["hit_eos"] and row["answer"].strip() == ex["solution"] and row["nfe"] == 5
        assert row["rewards"] == {"countdown_reward": 1.0}
    # left padding with an attention mask, sample ids = example indices
    mask = seen["attention_mask"]
    assert seen["sample_ids"] == [0, 1, 2] and mask[:, -1].all()
    lengths = mask.sum(1)
    for r in range(3):
        assert not mask[r, : mask.shape[1] - lengths[r]].any()
        assert (seen["prompt_ids"][r, : mask.shape[1] - lengths[r]] == tiny.pad_token_id).all()


def test_answer_rate_explains_a_zero(tiny, countdown, monkeypatch):
    """Completions without a readable answer: accuracy 0.0 and answer rate 0.0 (nothing could be read), against one
    readable wrong answer out of three: accuracy 0.0, answer rate 1/3, accuracy of the answered 0.0."""
    task, examples = countdown
    tok = tiny.tokenizer

    def fake(texts):
        def generate(model, prompt_ids, *, gen_length, sample_ids, **kwargs):
            rows = []
            for i in sample_ids.tolist():
                ids = tok(texts[i], add_special_tokens=False)["input_ids"] + [tiny.eos_token_id]
                rows.append((ids + [tiny.eos_token_id] * gen_length)[:gen_length])
            return SimpleNamespace(completions=torch.tensor(rows), nfe=torch.full((len(rows),), 4))
        return generate

    monkeypatch.setattr(stp.sampler, "generate", fake(["no tags at all"] * 3))
    none = evaluate(tiny, task, examples, gen_length=64, block_length=32, steps=32, progress=False)
    assert none["accuracy"] == 0.0 and none["answer_rate"] == 0.0 and none["n_answered"] == 0
    assert none["accuracy_of_answered"] is None
    wrong = "<reasoning>\nx\n</reasoning>\n<answer>\n1+1\n</answer>"
    monkeypatch.setattr(stp.sampler, "generate", fake([wrong, "untagged", "untagged"]))
    some = evaluate(tiny, task, examples, gen_length=64, block_length=32, steps=32, progress=False)
    assert some["accuracy"] == 0.0 and some["n_answered"] == 1
    assert some["answer_rate"] == pytest.approx(1 / 3) and some["accuracy_of_answered"] == 0.0


def test_model_without_tokenizer(tiny, countdown, monkeypatch):
    task, examples = countdown
    monkeypatch.setattr(tiny, "tokenizer", None)
    with pytest.raises(EvalError, match="has no tokenizer"):
        evaluate(tiny, task, examples, progress=False, **GEN)


def test_resume_generates_only_missing(tiny, countdown, tmp_path, monkeypatch):
    task, examples = countdown
    out = tmp_path / "res.jsonl"
    counter = CountingGenerate()
    monkeypatch.setattr(stp.sampler, "generate", counter)
    with pytest.warns(EvalWarning):
        first = evaluate(tiny, task, examples[:2], output=out, batch_size=1, progress=False, **GEN)
    assert counter.rows == 2 and first["n_generated"] == 2
    # a bigger run with another batch size (not a setting) generates only the missing example
    with pytest.warns(EvalWarning):
        second = evaluate(tiny, task, examples, output=out, batch_size=3, progress=False, **GEN)
    assert counter.rows == 3 and second["n_generated"] == 1 and second["n_resumed"] == 2
    # and a third run generates nothing at all
    monkeypatch.setattr(stp.sampler, "generate", no_generate)
    third = evaluate(tiny, task, examples, output=out, progress=False, **GEN)
    assert third["n_generated"] == 0 and third["n_resumed"] == 3
    rows = read_rows(out)
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["completion"] for r in third["records"]] == [r["completion"] for r in rows]
    # model=None works when nothing is left to generate, and fails clearly otherwise
    assert evaluate(None, task, examples, output=out, progress=False, identity={"model": "tiny", "dtype": "float32"},
                    **GEN)["n"] == 3
    with pytest.raises(EvalError, match="no model given"):
        evaluate(None, task, examples, progress=False, **GEN)


def test_resume_settings_mismatch(tiny, countdown, tmp_path):
    task, examples = countdown
    out = tmp_path / "res.jsonl"
    with pytest.warns(EvalWarning):
        evaluate(tiny, task, examples[:1], output=out, progress=False, **GEN)
    before = out.read_bytes()
    with pytest.raises(ResumeError, match=r"res.jsonl:1: written with different settings.*'steps': file has 16, "
                                          r"this run 32"):
        evaluate(tiny, task, examples, output=out, progress=False, **{**GEN, "steps": 32})
    with pytest.raises(ResumeError, match="'d1_compat': file has False, this run True"):
        evaluate(tiny, get_task("countdown", d1_compat=True), examples, output=out, progress=False, **GEN)
    # a changed data file: same settings, another example at index 0
    changed = [{**examples[0], "target": examples[0]["target"] + 1}, *examples[1:]]
    with pytest.raises(ResumeError, match="example index 0 was made from a different example"):
        evaluate(tiny, task, changed, output=out, progress=False, **GEN)
    assert out.read_bytes() == before


def test_resume_corrupt_trailing_line(tiny, countdown, tmp_path, monkeypatch):
    task, examples = countdown
    out = tmp_path / "res.jsonl"
    with pytest.warns(EvalWarning):
        evaluate(tiny, task, examples[:2], output=out, progress=False, **GEN)
    with open(out, "a") as f:
        f.write('{"index": 2, "settings_hash": "ab')  # a write cut short by a kill
    counter = CountingGenerate()
    monkeypatch.setattr(stp.sampler, "generate", counter)
    with pytest.warns(EvalWarning) as record:
        result = evaluate(tiny, task, examples, output=out, progress=False, **GEN)
    messages = [str(w.message) for w in record]
    assert any("res.jsonl:3: corrupt last line" in m and "dropped" in m for m in messages), messages
    assert counter.rows == 1 and result["n_resumed"] == 2 and result["n"] == 3
    rows = read_rows(out)  # every line valid JSON again
    assert [r["index"] for r in rows] == [0, 1, 2]


def test_resume_corrupt_middle_line_is_an_error(tiny, countdown, tmp_path):
    task, examples = countdown
    out = tmp_path / "res.jsonl"
    with pytest.warns(EvalWarning):
        evaluate(tiny, task, examples[:2], output=out, progress=False, **GEN)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + "garbage\n" + lines[1])
    with pytest.raises(ResumeError, match=r"res.jsonl:2: not a valid JSON row.*not the last line"):
        evaluate(tiny, task, examples, output=out, progress=False, **GEN)
    out.write_text(lines[0] + lines[0])
    with pytest.raises(ResumeError, match="res.jsonl:2: example index 0 is already on line 1"):
        evaluate(tiny, task, examples, output=out, progress=False, **GEN)


def test_read_results_adds_missing_final_newline(tiny, countdown, tmp_path):
    task, examples = countdown
    out = tmp_path / "res.jsonl"
    with pytest.warns(EvalWarning):
        result = evaluate(tiny, task, examples[:1], output=out, progress=False, **GEN)
    out.write_bytes(out.read_bytes().rstrip(b"\n"))  # complete row, newline lost
    rows = stp_eval.read_results(out, result["settings"], examples=examples)
    assert list(rows) == [0] and out.read_bytes().endswith(b"}\n")
