"""Static priors (stp.prior, its selection in stp.anchors): anchor selection, the JSONL file (resume, kill safety,
corruption), the CLI's flag checks and the sampler hand-off. CPU only, tiny model, small canvases."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from stp import anchors as A
from stp import prior as P
from stp.models.tiny import build_tokenizer

TOK = build_tokenizer()
EOS, MASK = TOK.eos_token_id, TOK.mask_token_id

# Content: a b \boxed{a{b}c} d e <answer>7</answer> f, then EOS and two tokens after it.
CONTENT = "ab\\boxed{a{b}c}de<answer>7</answer>f"


def _ids(text: str, tail=(EOS, EOS, 0)) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"] + list(tail)


def _positions(mask) -> list[int]:
    return [i for i, v in enumerate(mask.tolist()) if v]


def test_hand_made_example_tokens():
    ids = _ids(CONTENT)
    toks = TOK.convert_ids_to_tokens(ids)
    assert toks[:3] == ["a", "b", "\\"] and toks[17:21] == ["<answer>", "7", "</answer>", "f"]
    assert ids[21] == EOS and len(ids) == 24


# Scores per position 0..23. Content 0..20; EOS at 21; 22, 23 after EOS (given the highest scores on purpose).
SCORES = [-1.0, -5.0, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8, -0.9, -0.15, -0.25, -0.35, -0.45, -0.55,
          -3.0, -0.5, -0.05, -0.01, -0.02, -4.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("rho, anchors", [
    # The STP authors' rule (default): only the text strictly inside is free: box content a{b}c = 9..13 and the
    # answer 7 = 18. Eligible: 0..8, 14..17, 19, 20 (n_rest = 15). Ascending scores: 1, 20, 15, 0, 8, 7, 6, 14,
    # {5, 16 tie at -0.5: position 5 first}, 4, 3, 2, 17 (<answer>, -0.05), 19 (</answer>, -0.02).
    (0.6, [2, 3, 4, 16, 17, 19]),  # int(15 * 0.6) = 9 freed: 1, 20, 15, 0, 8, 7, 6, 14, 5; both tags are anchors
    (0.5, [2, 3, 4, 5, 14, 16, 17, 19]),  # int(7.5) = 7 freed; the closing brace of the box (14) is an anchor
    (0.95, [19]),  # int(14.25) = 14 freed: only </answer>, the most confident eligible token, stays
    (0.0, list(range(9)) + [14, 15, 16, 17, 19, 20]),
    (1.0, []),
])
def test_answer_low_confidence_inside_exact(rho, anchors):
    for kwargs in ({}, {"free_rule": "inside"}):
        sel = P.select_anchors(SCORES, _ids(CONTENT), TOK, rho=rho, strategy="answer_low_confidence", **kwargs)
        assert _positions(sel.anchors) == anchors
        assert _positions(sel.span) == [9, 10, 11, 12, 13, 18]
        assert _positions(sel.ended) == [21, 22, 23] and sel.valid_length == 22
        assert sel.n_rest == 15 and sel.n_anchors == 15 - int(15 * rho)


@pytest.mark.parametrize("rho, anchors", [
    # The inclusive rule: eligible 0, 1, 15, 16, 20 (boxed = 2..14, answer = 17..19, EOS+after = 21..23); n_rest = 5.
    (0.6, [0, 16]),  # int(5 * 0.6) = 3 freed: 1 (-5), 20 (-4), 15 (-3)
    (0.5, [0, 15, 16]),  # int(2.5) = 2 freed: 1, 20
    (0.95, [16]),  # int(4.75) = 4 freed: only the most confident eligible token (-0.5) stays
    (0.0, [0, 1, 15, 16, 20]),
    (1.0, []),
])
def test_answer_low_confidence_inclusive_exact(rho, anchors):
    sel = P.select_anchors(SCORES, _ids(CONTENT), TOK, rho=rho, strategy="answer_low_confidence",
                           free_rule="inclusive")
    assert _positions(sel.anchors) == anchors
    assert _positions(sel.span) == list(range(2, 15)) + [17, 18, 19]
    assert _positions(sel.ended) == [21, 22, 23] and sel.valid_length == 22
    assert sel.n_rest == 5 and sel.n_anchors == 5 - int(5 * rho)


@pytest.mark.parametrize("rho, anchors", [
    # low_confidence: every content position 0..20 is eligible (n_rest = 21); EOS and after still never.
    # Ascending: 1, 20, 15, 0, 9, 8, 7, 6, 14, {5, 16 tie at -0.5: position 5 first}, 13, 4, 12, 3, 11, 2, 10, 17, ...
    (0.5, [2, 3, 4, 10, 11, 12, 13, 16, 17, 18, 19]),  # int(10.5) = 10 freed: 1, 20, 15, 0, 9, 8, 7, 6, 14, 5
    (0.9, [17, 18, 19]),  # int(18.9) = 18 freed; the 3 highest remain: 18 (-0.01), 19 (-0.02), 17 (-0.05)
    (0.0, list(range(21))),
])
def test_low_confidence_exact(rho, anchors):
    sel = P.select_anchors(SCORES, _ids(CONTENT), TOK, rho=rho, strategy="low_confidence")
    assert _positions(sel.anchors) == anchors
    assert sel.n_rest == 21 and sel.n_anchors == 21 - int(21 * rho)
    assert not sel.span.any()


def _expected_random(seed, sample_id, eligible, rho):
    u = A._random_scores(seed, sample_id, 24)
    order = sorted(eligible, key=lambda i: (float(u[i]), i))
    return sorted(order[int(len(eligible) * rho):])


@pytest.mark.parametrize("strategy, rule, eligible", [
    ("random", "inside", list(range(21))), ("answer_random", "inclusive", [0, 1, 15, 16, 20]),
    ("answer_random", "inside", list(range(9)) + [14, 15, 16, 17, 19, 20])])
@pytest.mark.parametrize("rho", [0.3, 0.6, 0.95])
def test_random_exact_and_keyed(strategy, rule, eligible, rho):
    sel = P.select_anchors(None, _ids(CONTENT), TOK, rho=rho, strategy=strategy, seed=7, sample_id=12345,
                           free_rule=rule)
    assert _positions(sel.anchors) == _expected_random(7, 12345, eligible, rho)
    again = P.select_anchors(SCORES, _ids(CONTENT), TOK, rho=rho, strategy=strategy, seed=7, sample_id=12345,
                             free_rule=rule)
    assert torch.equal(sel.anchors, again.anchors)  # scores are ignored; no global RNG involved
    torch.manual_seed(0)
    a = P.select_anchors(None, _ids(CONTENT), TOK, rho=0.5, strategy="random", seed=7, sample_id=1).anchors
    torch.manual_seed(1)
    b = P.select_anchors(None, _ids(CONTENT), TOK, rho=0.5, strategy="random", seed=7, sample_id=1).anchors
    assert torch.equal(a, b)


def test_random_pinned_values():
    """Regression pin of the counter-RNG stream: changing it changes every random prior already built."""
    assert A._random_scores(0, 0, 4).tolist() == pytest.approx([0.0312808, 0.3952108, 0.4588467, 0.1965349], abs=1e-6)
    sel = P.select_anchors(None, _ids(CONTENT), TOK, rho=0.5, strategy="random", seed=0, sample_id=0)
    assert _positions(sel.anchors) == [1, 2, 5, 6, 8, 9, 10, 12, 13, 14, 19]
    sel = P.select_anchors(None, _ids(CONTENT), TOK, rho=0.5, strategy="answer_random", seed=0, sample_id=0,
                           free_rule="inclusive")
    assert _positions(sel.anchors) == [1, 16, 20]
    other = P.select_anchors(None, _ids(CONTENT), TOK, rho=0.5, strategy="random", seed=1, sample_id=0)
    assert _positions(other.anchors) != [1, 2, 5, 6, 8, 9, 10, 12, 13, 14, 19]  # the seed matters


@pytest.mark.parametrize("rule", P.FREE_RULES)
@pytest.mark.parametrize("rho", [0.0, 0.05, 0.15, 0.5, 0.85, 0.95, 1.0])
@pytest.mark.parametrize("strategy", P.STRATEGIES)
def test_counts_and_spans_never_anchors(rho, strategy, rule):
    g = torch.Generator().manual_seed(3)
    texts = ["x" * 7 + "\\boxed{1{2}{3}}yy<answer>\n42\n</answer>zz", "<answer>unclosed " + "q" * 9,
             "pre \\boxed{never closed {", "plain text without spans"]
    for text in texts:
        ids = _ids(text, tail=(MASK, EOS) + (5,) * 4)
        ids[3] = MASK  # a [MASK] inside the content is never an anchor
        scores = torch.randn(len(ids), generator=g)
        sel = P.select_anchors(scores, ids, TOK, rho=rho, strategy=strategy, seed=1, sample_id=9, free_rule=rule)
        assert sel.n_anchors == sel.n_rest - int(sel.n_rest * rho)
        assert not (sel.anchors & (sel.span | sel.ended | sel.masked)).any()
        assert sel.ended.sum() == 5 and sel.valid_length == len(ids) - 4
        if strategy.startswith("answer_"):
            decoded = [TOK.decode([t]) for t in ids]
            inside_text = {"1", "2", "3", "4", "\n"} | ({"<answer>", "</answer>", "{", "}"} if rule == "inclusive"
                                                      else set())
            for i in _positions(sel.anchors):
                assert decoded[i] not in inside_text
            assert sel.n_rest == int((~sel.span & ~sel.ended & ~sel.masked).sum())
        else:
            assert sel.n_rest == len(ids) - 5 - 2  # content minus the two [MASK]s


def test_free_spans_brace_matching_inclusive():
    assert P.free_spans("a\\boxed{a{b}c}d", "inclusive") == [(1, 14)]
    assert P.free_spans("<answer>x</answer> <answer>y", "inclusive") == [(0, 18), (19, 28)]
    assert P.free_spans("\\boxed{\\frac{1}{2}} and \\boxed{3}", "inclusive") == [(0, 19), (24, 33)]
    assert P.free_spans("nothing", "inclusive") == []


def test_free_spans_inside_is_the_authors_rule():
    """Expected values from the authors' selection: the group of ``<answer>(.*?)</answer>`` (re.DOTALL, each match
    from the end of the previous one) and, for every ``\\boxed{`` match, the text up to its brace-matched ``}``
    (counting every brace; a box never closed gives nothing)."""
    assert P.free_spans("a\\boxed{a{b}c}d") == [(8, 13)]
    assert P.free_spans("<answer>x</answer> <answer>y") == [(8, 9)]  # the unclosed second block frees nothing
    assert P.free_spans("<answer>\n42\n</answer>") == [(8, 12)]  # newlines inside (DOTALL)
    assert P.free_spans("<answer>a<answer>b</answer>") == [(8, 18)]  # from the first tag to the next closing one
    assert P.free_spans("<answer>a</answer></answer>b<answer>c</answer>") == [(8, 9), (36, 37)]
    assert P.free_spans("<answer></answer>\\boxed{}") == []  # empty contents free nothing
    assert P.free_spans("\\boxed{\\frac{1}{2}} and \\boxed{3}") == [(7, 18), (31, 32)]
    assert P.free_spans("\\boxed{\\boxed{1}}") == [(7, 16), (14, 15)]  # a box inside a box: both contents
    assert P.free_spans("\\boxed{a \\boxed{b}") == [(16, 17)]  # the outer box never closes
    assert P.free_spans("pre \\boxed{never closed {") == []
    assert P.free_spans("nothing") == []
    with pytest.raises(ValueError, match="rule='all'; allowed: inside, inclusive"):
        P.free_spans("x", "all")


def test_unclosed_answer_frees_nothing_inside():
    ids = _ids("ab<answer>7")
    sel = P.select_anchors([0.0] * len(ids), ids, TOK, rho=0.0, strategy="answer_low_confidence")
    assert not sel.span.any() and sel.n_rest == 4 and _positions(sel.anchors) == [0, 1, 2, 3]
    sel = P.select_anchors([0.0] * len(ids), ids, TOK, rho=0.0, strategy="answer_low_confidence",
                           free_rule="inclusive")
    assert _positions(sel.span) == [2, 3] and _positions(sel.anchors) == [0, 1]


def test_special_tokens_never_anchors():
    """Every special token (not only EOS and [MASK]) is kept out of the anchors and of n_rest; under the authors'
    rule the text is searched with them left out, so a special token splitting ``\\boxed{`` does not hide the box."""
    user = TOK.convert_tokens_to_ids("<|user|>")  # an added token flagged special, not in all_special_ids
    assert user not in TOK.all_special_ids and user in P.special_token_ids(TOK)
    head = TOK("x\\box", add_special_tokens=False)["input_ids"]
    tail = TOK("ed{5}y", add_special_tokens=False)["input_ids"]
    ids = head + [user] + tail + [EOS]  # x \ b o x <|user|> e d { 5 } y EOS
    scores = [float(i) for i in range(len(ids))]  # later positions more confident
    sel = P.select_anchors(scores, ids, TOK, rho=0.0, strategy="answer_low_confidence")
    assert _positions(sel.special) == [5] and _positions(sel.span) == [9]
    assert sel.n_rest == len(ids) - 1 - 2 and 5 not in _positions(sel.anchors)
    assert sel.kinds() == "aaaaaxaaasaae"
    sel = P.select_anchors(scores, ids, TOK, rho=0.0, strategy="low_confidence")
    assert 5 not in _positions(sel.anchors) and sel.n_rest == len(ids) - 2
    # Scored as the most confident token, it is still never chosen.
    hot = list(scores)
    hot[5] = 100.0
    sel = P.select_anchors(hot, ids, TOK, rho=0.9, strategy="low_confidence")
    assert _positions(sel.anchors) == [10, 11]  # 11 eligible, int(9.9) = 9 freed: } and y, the most confident, stay
    sel = P.select_anchors(hot, ids, TOK, rho=0.9, strategy="low_confidence", special_ids=[])
    assert _positions(sel.anchors) == [5, 11]  # an explicit empty set excludes only EOS and [MASK]: 12 eligible


def test_no_eos_means_all_content():
    ids = TOK("abcdef", add_special_tokens=False)["input_ids"]
    sel = P.select_anchors([0.0] * 6, ids, TOK, rho=0.5, strategy="low_confidence")
    assert sel.valid_length == 6 and sel.n_rest == 6 and sel.n_anchors == 3


def test_select_anchors_bad_args():
    with pytest.raises(ValueError, match="strategy='best'; allowed: answer_low_confidence"):
        P.select_anchors(SCORES, _ids(CONTENT), TOK, rho=0.5, strategy="best")
    with pytest.raises(ValueError, match="rho=1.5"):
        P.select_anchors(SCORES, _ids(CONTENT), TOK, rho=1.5, strategy="random")
    with pytest.raises(ValueError, match="free_rule='tags'; allowed: inside, inclusive"):
        P.select_anchors(SCORES, _ids(CONTENT), TOK, rho=0.5, strategy="random", free_rule="tags")


# ------------------------------------------------------------------------------------------- CLI, end to end

ARGS = ["--model", "tiny", "--task", "countdown", "--source", "generated", "--limit", "3", "--gen-length", "32",
        "--block-length", "32", "--steps", "4", "--rho", "0.5", "--batch-size", "2"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("prior") / "priors.jsonl"
    assert P.main([*ARGS, "--out", str(out)]) == 0
    return out


def _lines(path):
    return path.read_text().splitlines()


def _same(line_a: str, line_b: str) -> bool:
    """Records equal, scores up to float noise (left padding in a bigger batch moves them by ~1 ulp)."""
    a, b = json.loads(line_a), json.loads(line_b)
    sa, sb = a.pop("scores"), b.pop("scores")
    return a == b and torch.allclose(torch.tensor(sa), torch.tensor(sb), atol=1e-5)


def test_end_to_end_file(built):
    from stp.models import load
    from stp.tasks import get_task

    lines = _lines(built)
    assert len(lines) == 3
    recs = [json.loads(line) for line in lines]
    task = get_task("countdown")
    model = load("tiny")
    texts = [task.format_prompt(e, model.tokenizer) for e in task.load("train", source="generated", n=3)]
    assert [r["prompt_id"] for r in recs] == [P.prompt_id(t) for t in texts]
    assert [r["index"] for r in recs] == [0, 1, 2] and [r["prompt"] for r in recs] == texts
    for rec in recs:
        assert len(rec["completion_ids"]) == len(rec["anchor_mask"]) == len(rec["kinds"]) == len(rec["scores"]) == 32
        assert rec["settings"]["rho"] == 0.5 and rec["settings"]["strategy"] == "answer_low_confidence"
        assert rec["settings"]["free_rule"] == "inside"
        sel = P.select_anchors(rec["scores"], rec["completion_ids"], model.tokenizer, rho=0.5,
                               strategy="answer_low_confidence", eos_token_id=model.eos_token_id,
                               mask_token_id=model.mask_token_id)
        assert "".join("1" if a else "0" for a in sel.anchors.tolist()) == rec["anchor_mask"]
        assert rec["n_anchors"] == rec["n_rest"] - int(rec["n_rest"] * 0.5) == rec["anchor_mask"].count("1")
    # Scores: log p(s_i | prompt, all masked) against a direct full-logits computation.
    rec = recs[1]
    ids = torch.tensor([model.tokenizer(texts[1], add_special_tokens=False)["input_ids"]])
    x = torch.cat([ids, torch.full((1, 32), model.mask_token_id)], 1)
    with torch.no_grad():
        logp = torch.log_softmax(model.logits(x)[0, ids.shape[1]:].float(), -1)
    want = logp.gather(1, torch.tensor(rec["completion_ids"])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(rec["scores"]), want, atol=1e-4)
    assert set(P.load_priors(built)) == {r["prompt_id"] for r in recs}


def test_resume_skips_finished(built, tmp_path, monkeypatch):
    out = tmp_path / "p.jsonl"
    shutil.copy(built, out)
    before = out.read_bytes()

    def fail(*a, **k):
        raise AssertionError("generate must not run: every prompt is finished")

    monkeypatch.setattr("stp.sampler.generate", fail)
    assert P.main([*ARGS, "--out", str(out)]) == 0
    assert out.read_bytes() == before


def test_kill_safety_torn_last_line(built, tmp_path):
    out = tmp_path / "p.jsonl"
    data = built.read_bytes()
    cut = data.rindex(b"\n", 0, len(data) - 1) + 1 + 100  # 100 bytes into the last line
    out.write_bytes(data[:cut])
    with pytest.warns(P.TornLineWarning, match=r"p\.jsonl:3: incomplete last line"):
        assert len(P.load_priors(out)) == 2
    with pytest.warns(P.TornLineWarning):
        assert P.main([*ARGS, "--out", str(out)]) == 0
    new, old = _lines(out), _lines(built)
    assert len(new) == 3 and new[:2] == old[:2]
    assert _same(new[2], old[2])  # the lost prompt was redone


def test_crash_keeps_finished_batches(built, tmp_path, monkeypatch):
    """A run dying in its second batch leaves the first batch's lines complete on disk (fsync'ed per batch)."""
    import stp.sampler

    out = tmp_path / "p.jsonl"
    out.write_text(_lines(built)[0] + "\n")  # prompt 0 finished; 1 and 2 to do, one per batch
    real, calls = stp.sampler.generate, []

    def dies_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr("stp.sampler.generate", dies_second)
    with pytest.raises(KeyboardInterrupt):
        P.main([*ARGS, "--batch-size", "1", "--out", str(out)])
    new = _lines(out)
    assert len(new) == 2 and new[0] == _lines(built)[0] and _same(new[1], _lines(built)[1])


def test_corrupt_middle_line_is_an_error(built, tmp_path, monkeypatch):
    out = tmp_path / "p.jsonl"
    lines = _lines(built)
    out.write_text("\n".join([lines[0], lines[1][:50] + "#garbage", lines[2]]) + "\n")
    with pytest.raises(P.PriorFileError, match=r"p\.jsonl:2: corrupt line"):
        P.load_priors(out)
    monkeypatch.setattr("stp.models.load", _no_load)
    with pytest.raises(SystemExit, match=r"p\.jsonl:2: corrupt line"):
        P.main([*ARGS, "--out", str(out)])
    bad_schema = json.loads(lines[1])
    bad_schema["anchor_mask"] = "01"
    out.write_text("\n".join([lines[0], json.dumps(bad_schema), lines[2]]) + "\n")
    with pytest.raises(P.PriorFileError, match=r"p\.jsonl:2: anchor_mask must be 32 chars"):
        P.load_priors(out)


def _no_load(*a, **k):
    raise AssertionError("the model must not be loaded")


def test_mixed_settings_refused(built, tmp_path, monkeypatch):
    out = tmp_path / "p.jsonl"
    shutil.copy(built, out)
    monkeypatch.setattr("stp.models.load", _no_load)
    args = [a if a != "0.5" else "0.9" for a in ARGS]
    with pytest.raises(SystemExit, match=r"written with --rho 0\.5; this run has --rho 0\.9"):
        P.main([*args, "--out", str(out)])
    with pytest.raises(SystemExit, match=r"--strategy 'answer_low_confidence'; this run has --strategy 'random'"):
        P.main([*ARGS, "--strategy", "random", "--out", str(out)])
    with pytest.raises(SystemExit, match=r"--free-rule 'inside'; this run has --free-rule 'inclusive'"):
        P.main([*ARGS, "--free-rule", "inclusive", "--out", str(out)])


def test_file_without_free_rule_counts_as_inclusive(built, tmp_path, monkeypatch):
    """Files written before the setting existed were built with the inclusive rule: resumable with it only."""
    out = tmp_path / "p.jsonl"
    recs = [json.loads(line) for line in _lines(built)]
    for rec in recs:
        del rec["settings"]["free_rule"]
    out.write_text("".join(json.dumps(r) + "\n" for r in recs))
    before = out.read_bytes()
    monkeypatch.setattr("stp.models.load", _no_load)
    with pytest.raises(SystemExit, match=r"written with --free-rule 'inclusive'; this run has --free-rule 'inside'"):
        P.main([*ARGS, "--out", str(out)])
    monkeypatch.undo()
    monkeypatch.setattr("stp.sampler.generate", _no_load)  # every prompt is done: nothing is generated
    assert P.main([*ARGS, "--free-rule", "inclusive", "--out", str(out)]) == 0
    assert out.read_bytes() == before


@pytest.mark.parametrize("flag, value, allowed, extra", [
    ("--rho", "1.5", "a number in [0, 1]", []),
    ("--strategy", "best", "answer_low_confidence, low_confidence, random, answer_random", []),
    ("--free-rule", "tags", "inside, inclusive", []),
    ("--task", "mbpp", "gsm8k, math, countdown, sudoku", []),
    ("--split", "dev", "train, test", []),
    ("--block-length", "24", "a divisor of --gen-length=32", []),
    ("--steps", "3", "a multiple of the number of blocks (--gen-length / --block-length = 2)",
     ["--block-length", "16"]),
    ("--steps", "0", "an integer >= 1", []),
    ("--temperature", "-1", "a finite number >= 0", []),
    ("--batch-size", "0", "an integer >= 1", []),
    ("--limit", "x", "an integer >= 1", []),
    ("--dtype", "int8", "auto, float32, bfloat16, float16", []),
    ("--device", "tpu9", "a torch device", []),
    ("--data", "/nonexistent/file.jsonl", "an existing data file", []),
    ("--source", "web", "file, hub, generated", []),
    ("--model", "/nonexistent/model", "'tiny', an existing model directory", []),
])
def test_bad_flags_fail_before_model_load(flag, value, allowed, extra, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("stp.models.load", _no_load)
    with pytest.raises(SystemExit) as e:
        P.main([*ARGS, *extra, flag, value, "--out", str(tmp_path / "p.jsonl")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag}={value!r} is not allowed; allowed: {allowed}" in err
    assert not (tmp_path / "p.jsonl").exists()


@pytest.mark.slow
def test_sampler_prior_anchors_unchanged(built):
    from stp.models import load
    from stp.sampler import generate

    recs = list(P.load_priors(built).values())
    model = load("tiny")
    prior = P.to_sampler_prior(recs, 32, "cpu")
    assert prior.tokens.shape == prior.mask.shape == (3, 32)
    assert prior.mask.sum(1).tolist() == [r["n_anchors"] for r in recs]
    enc = model.tokenizer([r["prompt"] for r in recs], add_special_tokens=False, padding=True, return_tensors="pt")
    out = generate(model, enc["input_ids"], attention_mask=enc["attention_mask"], gen_length=32, block_length=32,
                   steps=4, temperature=0.9, seed=5, prior=prior)
    assert torch.equal(out.completions[prior.mask], prior.tokens[prior.mask])
    assert out.anchors_kept.tolist() == [r["n_anchors"] for r in recs]
    # A longer canvas: anchors stay at their absolute positions.
    wide = P.to_sampler_prior(recs, 64)
    assert torch.equal(wide.mask[:, :32], prior.mask) and not wide.mask[:, 32:].any()
    with pytest.raises(ValueError, match="anchors at position >= gen_length=8"):
        P.to_sampler_prior(recs, 8)


@pytest.mark.slow
def test_build_priors_library_batch_independent():
    """The library call on token prompts; a prompt's completion does not depend on its batch."""
    from stp.models import load

    model = load("tiny")
    prompts = [TOK("<|user|>\nhi<|eos|>\n<|assistant|>\n", add_special_tokens=False)["input_ids"],
               TOK("<|user|>\nadd 2 and 3 please<|eos|>\n<|assistant|>\n", add_special_tokens=False)["input_ids"]]
    both = P.build_priors(model, prompts, rho=0.5, strategy="random", gen_length=16, block_length=16, steps=8,
                          seed=3, keep_scores=False)
    alone = P.build_priors(model, prompts[1:], rho=0.5, strategy="random", gen_length=16, block_length=16, steps=8,
                           seed=3, keep_scores=False)
    assert both[1]["completion_ids"] == alone[0]["completion_ids"]
    assert both[1]["anchor_mask"] == alone[0]["anchor_mask"] and "scores" not in both[1]
    assert both[0]["prompt"] is None and both[0]["prompt_id"] == P.prompt_id(prompts[0])


def test_prior_reexports_the_anchor_selection():
    """``stp.prior``'s public names stay importable from it after the selection moved to ``stp.anchors``."""
    for name in A.__all__:
        assert getattr(P, name) is getattr(A, name)
    assert set(A.__all__) <= set(P.__all__)
