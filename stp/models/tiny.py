"""The embedded tiny model: a small bidirectional Llama and a character-level tokenizer, built in code.

No files, no download, deterministic: `build_tiny(seed=0)` gives the same weights on every machine with the same torch
(initialisation runs under a forked RNG, so the caller's global RNG state is untouched). Sized to train on 2 CPU
cores: hidden 128, 4 layers, 4 heads, MLP 384 (~0.8 M parameters with a ~110-token vocabulary).
"""

from __future__ import annotations

import string

import torch

from .base import DiffusionLM

MASK_TOKEN = "<|mask|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
TAG_TOKENS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")

# Characters: digits, letters, ASCII punctuation (covers + - * / = ( ) ^ % . , \ { } < >), space, newline.
CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"

# system/user/assistant turns, each closed by EOS; `add_generation_prompt` opens the assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


def build_tokenizer():
    """Character-level `PreTrainedTokenizerFast`: one id per character of `CHARS`, special tokens (mask, eos, pad,
    unk, role markers) and whole-token `<reasoning>`, `</reasoning>`, `<answer>`, `</answer>`. Deterministic."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD_TOKEN, EOS_TOKEN, MASK_TOKEN, UNK_TOKEN, *ROLE_TOKENS]
    vocab = {tok: i for i, tok in enumerate([*specials, *TAG_TOKENS, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    # Added tokens are matched whole before the per-character split (ids already in the vocabulary are reused).
    tok.add_special_tokens(specials)
    tok.add_tokens(list(TAG_TOKENS))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        mask_token=MASK_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_tiny(seed: int = 0, **config_overrides) -> DiffusionLM:
    """The tiny model, randomly initialised from `seed` (float32, CPU). `config_overrides` go to `LlamaConfig`
    (e.g. `num_hidden_layers=2`, `attn_implementation="eager"`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        use_cache=False,
        bos_token_id=None,
        attn_implementation="sdpa",
    )
    settings.update(config_overrides)
    config = LlamaConfig(**settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return DiffusionLM(model, tokenizer, mask_token_id=tokenizer.mask_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, shift_logits=False, name="tiny", family="tiny")
