"""stp.models: LLaDA / Dream checkpoints against an independent float64 forward, bidirectional padding masks, the tiny
model's tokenizer, save/load round trips and the error messages on bad inputs. CPU only, no network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: never touch the network

import json
from pathlib import Path

import pytest
import torch

from stp.models import DiffusionLM, build_tiny, build_tokenizer, load

from ._compare import assert_close
from ._models_reference import (
    DREAM_CONFIG,
    LLADA_CONFIG,
    dream_weights,
    llada_weights,
    reference_logits,
    write_checkpoint,
)

ATTN = ["sdpa", "eager"]
F32 = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny() -> DiffusionLM:
    return build_tiny(seed=0, num_hidden_layers=2)


def _ids(seed: int, bsz: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (bsz, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints against the reference forward


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("shards", [1, 3])
def test_llada_matches_reference(tmp_path: Path, seed: int, attn: str, shards: int) -> None:
    weights = llada_weights(LLADA_CONFIG, seed)
    path = write_checkpoint(tmp_path / "llada", LLADA_CONFIG, weights, shards=shards)
    model = load(str(path), attn_implementation=attn)
    assert type(model.model).__name__ == "LlamaForCausalLM"
    assert (model.mask_token_id, model.eos_token_id, model.pad_token_id) == (95, 94, 94)
    assert model.shift_logits is False and model.tokenizer is None and model.family == "llada"
    assert model.lm_head_weight is model.model.lm_head.weight  # the live parameter, not a copy
    assert model.lm_head_weight.shape == (LLADA_CONFIG["embedding_size"], LLADA_CONFIG["d_model"])
    assert model.dtype == torch.float32
    ids = _ids(seed, 2, 13, LLADA_CONFIG["vocab_size"])
    ref = reference_logits(weights, layout="llada", cfg=LLADA_CONFIG, ids=ids)
    with torch.no_grad():
        for mask in (None, torch.ones_like(ids)):
            got = model.logits(ids, mask)
            assert got.dtype == torch.float32
            assert_close(got, ref, **F32, what=f"LLaDA logits ({attn}, shards={shards}, mask={mask is not None})")
        hidden = model.backbone(ids)
        assert_close(hidden @ model.lm_head_weight.T, ref, **F32, what="backbone @ W.T")
        assert_close(model(ids), ref, **F32, what="forward")


@pytest.mark.parametrize("attn", ATTN)
def test_dream_matches_reference_with_shift(tmp_path: Path, seed: int, attn: str) -> None:
    weights = dream_weights(DREAM_CONFIG, seed)
    path = write_checkpoint(tmp_path / "dream", DREAM_CONFIG, weights, shards=2)
    model = load(str(path), attn_implementation=attn)
    assert type(model.model).__name__ == "Qwen2ForCausalLM"
    assert (model.mask_token_id, model.eos_token_id, model.pad_token_id) == (95, 94, 93)
    assert model.shift_logits is True and model.family == "dream"
    ids = _ids(seed, 2, 11, DREAM_CONFIG["vocab_size"])
    ref = reference_logits(weights, layout="dream", cfg=DREAM_CONFIG, ids=ids)
    with torch.no_grad():
        for mask in (None, torch.ones_like(ids)):
            assert_close(model.logits(ids, mask), ref, **F32, what=f"Dream logits ({attn}, mask={mask is not None})")
        # The shift lives in backbone: position 0 keeps its own hidden state, position i uses i - 1.
        unshifted = model.model.model(input_ids=ids).last_hidden_state
        hidden = model.backbone(ids)
        assert torch.equal(hidden[:, 0], unshifted[:, 0]) and torch.equal(hidden[:, 1:], unshifted[:, :-1])


def test_attention_is_bidirectional(tiny: DiffusionLM, seed: int) -> None:
    """A change at the last position reaches the first one (a causal model could not do that)."""
    ids = _ids(seed, 1, 9, tiny.vocab_size)
    other = ids.clone()
    other[0, -1] = (ids[0, -1] + 1) % tiny.vocab_size
    with torch.no_grad():
        assert not torch.allclose(tiny.logits(ids)[0, 0], tiny.logits(other)[0, 0])
    for module in tiny.model.modules():
        assert getattr(module, "is_causal", False) is False


# ---------------------------------------------------------------------------------------------------------------------
# Left padding


def _check_left_padding(model: DiffusionLM, seed: int, vocab: int) -> None:
    lengths = [7, 12, 3]
    width = max(lengths)
    seqs = [_ids(seed + i, 1, n, vocab)[0] for i, n in enumerate(lengths)]
    batch = torch.full((len(seqs), width), model.pad_token_id)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, s in enumerate(seqs):
        batch[row, width - len(s):] = s
        mask[row, width - len(s):] = 1
    with torch.no_grad():
        padded = model.logits(batch, mask)
        assert torch.isfinite(padded).all()
        for row, s in enumerate(seqs):
            alone = model.logits(s[None])[0]
            assert_close(padded[row, width - len(s):], alone, atol=1e-5, rtol=1e-5,
                         what=f"row {row} (length {len(s)}) padded vs alone")


@pytest.mark.parametrize("attn", ATTN)
def test_left_padding_tiny(seed: int, attn: str) -> None:
    model = build_tiny(seed=0, num_hidden_layers=2, attn_implementation=attn)
    _check_left_padding(model, seed, model.vocab_size)


@pytest.mark.parametrize("attn", ATTN)
def test_left_padding_llada_and_dream(tmp_path: Path, seed: int, attn: str) -> None:
    llada = load(str(write_checkpoint(tmp_path / "l", LLADA_CONFIG, llada_weights(LLADA_CONFIG, seed))),
                 attn_implementation=attn)
    _check_left_padding(llada, seed, LLADA_CONFIG["vocab_size"])
    dream = load(str(write_checkpoint(tmp_path / "d", DREAM_CONFIG, dream_weights(DREAM_CONFIG, seed))),
                 attn_implementation=attn)
    _check_left_padding(dream, seed, DREAM_CONFIG["vocab_size"])


def test_all_padding_row_is_finite(tiny: DiffusionLM) -> None:
    ids = torch.tensor([[5, 6, 7], [0, 0, 0]])
    with torch.no_grad():
        assert torch.isfinite(tiny.logits(ids, torch.tensor([[1, 1, 1], [0, 0, 0]]))).all()


# ---------------------------------------------------------------------------------------------------------------------
# Tiny model and tokenizer


def test_tokenizer_round_trip_and_specials() -> None:
    tok = build_tokenizer()
    text = ("<reasoning>\nUsing 3, 7, 25: (25 - 7) * 3 = 54, and 54/2 = 27.\n\\boxed{27}\n</reasoning>\n"
            "<answer>(25 - 7) * 3 / 2</answer>")
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids
    for special in ("<reasoning>", "</reasoning>", "<answer>", "</answer>", tok.mask_token, tok.eos_token,
                    tok.pad_token):
        one = tok(special, add_special_tokens=False).input_ids
        assert len(one) == 1, f"{special!r} -> {one}"
    assert len({tok.mask_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert build_tokenizer().get_vocab() == tok.get_vocab()  # deterministic
    masked = tok.decode(tok(f"1 + {tok.mask_token}", add_special_tokens=False).input_ids, skip_special_tokens=True)
    assert masked == "1 + "


def test_chat_template() -> None:
    tok = build_tokenizer()
    messages = [{"role": "system", "content": "Answer in tags."}, {"role": "user", "content": "2+2?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>\nAnswer in tags.<|eos|>\n<|user|>\n2+2?<|eos|>\n<|assistant|>\n"
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not no_prompt.endswith("<|assistant|>\n")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert tok.decode(ids) == text
    with pytest.raises(Exception, match="unknown role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_tiny_is_deterministic_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a, b = build_tiny(seed=0, num_hidden_layers=1), build_tiny(seed=0, num_hidden_layers=1)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), name
    c = build_tiny(seed=1, num_hidden_layers=1)
    assert not torch.equal(a.lm_head_weight, c.lm_head_weight)
    default = load("tiny")
    cfg = default.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (128, 4, 4, 384)
    assert default.name == "tiny" and default.tokenizer is not None
    assert default.mask_token_id == default.tokenizer.mask_token_id


# ---------------------------------------------------------------------------------------------------------------------
# save / load


def test_save_load_tiny(tiny: DiffusionLM, tmp_path: Path, seed: int) -> None:
    tiny.save(tmp_path / "saved")
    back = load(str(tmp_path / "saved"))
    assert type(back.model) is type(tiny.model)
    for attr in ("mask_token_id", "eos_token_id", "pad_token_id", "shift_logits", "name", "family"):
        assert getattr(back, attr) == getattr(tiny, attr), attr
    assert back.tokenizer is not None and back.tokenizer.get_vocab() == tiny.tokenizer.get_vocab()
    assert back.tokenizer.chat_template == tiny.tokenizer.chat_template
    ids = _ids(seed, 2, 10, tiny.vocab_size)
    with torch.no_grad():
        assert torch.equal(back.logits(ids), tiny.logits(ids))
    half = load(str(tmp_path / "saved"), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_rope_frequencies_stay_float32() -> None:
    """Casting the model to bf16 must not round the RoPE inverse frequencies (they are a float buffer)."""
    for model in (load("tiny", dtype=torch.bfloat16), build_tiny(num_hidden_layers=1).to(torch.bfloat16)):
        assert model.dtype == torch.bfloat16
        rope = model.model.model.rotary_emb
        assert rope.inv_freq.dtype == torch.float32
        assert torch.equal(rope.inv_freq, build_tiny(num_hidden_layers=1).model.model.rotary_emb.inv_freq)


def test_save_load_dream_keeps_shift(tmp_path: Path, seed: int) -> None:
    dream = load(str(write_checkpoint(tmp_path / "d", DREAM_CONFIG, dream_weights(DREAM_CONFIG, seed))))
    dream.save(tmp_path / "saved")
    back = load(str(tmp_path / "saved"))
    assert type(back.model).__name__ == "Qwen2ForCausalLM" and back.shift_logits is True
    assert (back.mask_token_id, back.eos_token_id, back.pad_token_id) == (95, 94, 93)
    ids = _ids(seed, 2, 8, DREAM_CONFIG["vocab_size"])
    with torch.no_grad():
        assert torch.equal(back.logits(ids), dream.logits(ids))


def test_checkpoint_tokenizer_with_custom_class_falls_back(tiny: DiffusionLM, tmp_path: Path) -> None:
    """Dream ships `tokenizer_class: DreamTokenizer` (remote code); we read the same files without remote code."""
    path = tmp_path / "d"
    write_checkpoint(path, {k: v for k, v in DREAM_CONFIG.items() if k != "mask_token_id"},
                     dream_weights(DREAM_CONFIG, 0))
    tiny.tokenizer.save_pretrained(path)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg |= {"tokenizer_class": "DreamTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer",
                                                                                None]}}
    cfg_path.write_text(json.dumps(cfg))
    model = load(str(path))
    assert model.tokenizer is not None
    assert model.mask_token_id == tiny.tokenizer.mask_token_id  # from the tokenizer: config.json has none


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs


def test_missing_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        load(str(tmp_path / "empty"))


def test_unknown_layout(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "g", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, {})
    with pytest.raises(ValueError, match="unknown model layout.*'gpt2'"):
        load(str(tmp_path / "g"))


def test_missing_weights(tmp_path: Path) -> None:
    path = tmp_path / "l"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(LLADA_CONFIG))
    (path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors or model.safetensors.index.json.*\.bin"):
        load(str(path))


def test_missing_shard(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "l", LLADA_CONFIG, llada_weights(LLADA_CONFIG, 0), shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load(str(path))


def test_no_mask_token(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no mask token.*'mask_token_id'"):
        load(str(tmp_path / "plain"))


def test_unsupported_llada_option_and_bad_tensors(tmp_path: Path) -> None:
    with pytest.raises(NotImplementedError, match="alibi=True"):
        load(str(write_checkpoint(tmp_path / "a", LLADA_CONFIG | {"alibi": True}, llada_weights(LLADA_CONFIG, 0))))
    weights = llada_weights(LLADA_CONFIG, 0)
    weights["model.transformer.blocks.0.mystery.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match="unexpected tensor 'model.transformer.blocks.0.mystery.weight'"):
        load(str(write_checkpoint(tmp_path / "b", LLADA_CONFIG, weights)))
    weights = llada_weights(LLADA_CONFIG, 0)
    del weights["model.transformer.blocks.1.up_proj.weight"]
    with pytest.raises(ValueError, match="lacks 1 tensors.*model.layers.1.mlp.up_proj.weight"):
        load(str(write_checkpoint(tmp_path / "c", LLADA_CONFIG, weights)))
    with pytest.raises(ValueError, match="shape"):
        load(str(write_checkpoint(tmp_path / "d", LLADA_CONFIG | {"mlp_hidden_size": 64},
                                  llada_weights(LLADA_CONFIG, 0))))


def test_hub_id_offline_and_bad_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="not a local directory and could not be fetched from the Hugging Face Hub"):
        load("stp-test-nonexistent-org/stp-test-nonexistent-model")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load(str(tmp_path / "nope" / "deeper"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        load(str(tmp_path / "file"))
    with pytest.raises(ValueError, match="attn_implementation"):
        load("tiny", attn_implementation="flash_attention_2")


def test_pretrained_name_resolves_through_stp_pretrain(tmp_path, monkeypatch):
    """'pretrained:TASK' loads the checkpoint stp.pretrain.ensure_pretrained returns (built once, then cached);
    the model layer itself builds nothing and says where the name is resolved."""
    import stp.pretrain

    saved = tmp_path / "ckpt"
    build_tiny(seed=3).save(saved)
    asked = []
    monkeypatch.setattr(stp.pretrain, "ensure_pretrained", lambda task, progress=True: asked.append(task) or saved)
    with pytest.raises(ValueError, match=r"stp.pretrain.load_model\('pretrained:sudoku'\)"):
        load("pretrained:sudoku")
    assert asked == []
    model = stp.pretrain.load_model("pretrained:sudoku")
    ids = torch.tensor([[5, 6, 7, 8]])
    assert asked == ["sudoku"]
    assert torch.equal(model.logits(ids), build_tiny(seed=3).logits(ids))
