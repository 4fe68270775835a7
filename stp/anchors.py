"""Anchor selection of the static priors (spatial pruning, docs/method.md section 1), pure: no model, no file, no
global RNG. ``stp.prior`` samples a completion per prompt from the base model, scores each token by
``log p(s_i | prompt, all masked)`` and calls :func:`select_anchors` here; its public names are re-exported there.

Given a completion and its scores, :func:`select_anchors` chooses the anchors: the ``answer_*`` strategies always
free the tokens that make up the answer, by one of two rules (``free_rule``):

- ``inside`` (default, the STP authors' rule): only the text strictly between a ``<answer>`` and the next
  ``</answer>``, and strictly between the braces of a ``\\boxed{...}`` (brace-matched), is freed: a token is freed
  when its characters overlap that text. The tags, ``\\boxed`` and its braces stay eligible and, being among
  the most confident tokens of a completion, often become anchors that fix the output format. An unclosed
  ``<answer>`` or ``\\boxed{`` frees nothing (the authors match ``<answer>(.*?)</answer>`` and drop an unmatched
  brace).
- ``inclusive`` (this project's earlier rule): the whole ``<answer>...</answer>`` block with its tags and the
  whole ``\\boxed{...}`` from the backslash to the closing brace are freed, and an unclosed block or box frees
  everything to the end of the text.

Of the remaining ``n_rest`` eligible positions, ``int(n_rest * rho)`` are freed -- the lowest-scoring ones
(``*low_confidence``) or uniformly random ones (``*random``, from the counter RNG of ``stp_kernels.reference``
keyed by (seed, prompt id): no global RNG). Ties are broken by position (the earlier position is freed first).
The other ``n_rest - int(n_rest * rho)`` positions are the anchors, fixed at their absolute canvas positions.

Special tokens. No special token of the tokenizer (its ``all_special_ids`` and every added token flagged special:
EOS, padding, [MASK], chat-role markers...) is ever an anchor, and none counts in ``n_rest``: the authors build their
priors from completions decoded without special tokens, so such tokens do not exist for their selection. Under the
``inside`` rule the text searched for tags and boxes is likewise decoded without them.

End of sequence. The canvas is ``gen_length`` positions and the completion keeps all of them (absolute positions
are what anchors mean), but only the *content* -- positions before the first EOS -- can hold anchors. The first EOS
and everything after it (EOS / padding) are never anchors, for two reasons: (a) an anchored EOS at position p would
cap every later rollout of that prompt at p tokens (its first EOS can then be no later than p), so RL could never
lengthen the answer beyond the base model's one sample; (b) trailing EOS padding is typically what an instruct
model predicts most confidently for a fully masked tail (expected for LLaDA, not measured here), so with rho = 0.95
the 5% anchor budget would go mostly to padding and the prior would fix little content. Those positions are free
(decoded in rollouts; in the likelihood they are the padding positions that are always masked). They do not count
in ``n_rest``. A completion without EOS has no padding: every position is content. A position still holding
``[MASK]`` (an untrained model can sample [MASK] as its own x0) is never an anchor either (an anchor must be a real
token).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import torch

from stp_kernels.reference import counter_uniform, row_keys

__all__ = ["STRATEGIES", "FREE_RULES", "Selection", "free_spans", "special_token_ids", "select_anchors"]

STRATEGIES = ("answer_low_confidence", "low_confidence", "random", "answer_random")
FREE_RULES = ("inside", "inclusive")  # which text the answer_* strategies always free (module docstring)
_RANDOM_STEP = 0x9F1A0C5  # counter "step" of the random strategies (distinct from the sampler's steps)


# ----------------------------------------------------------------------------------------------------- selection


@dataclass
class Selection:
    """Anchor choice for one completion of L positions (all [L] bool tensors on the CPU)."""

    anchors: torch.Tensor  # True = anchor (fixed at this absolute position)
    span: torch.Tensor  # always free: inside <answer>...</answer> or \boxed{...} (answer_* strategies)
    ended: torch.Tensor  # the first EOS and everything after it (never anchors)
    masked: torch.Tensor  # positions holding [MASK] (never anchors)
    freed: torch.Tensor  # eligible positions freed by score / at random
    valid_length: int  # first EOS index + 1, or L without EOS
    n_rest: int  # eligible positions: content, not span, not [MASK], not another special token
    special: torch.Tensor | None = None  # other special tokens of the tokenizer (never anchors)

    @property
    def n_anchors(self) -> int:
        return int(self.anchors.sum())

    def kinds(self) -> str:
        """One char per position: a anchor, e EOS/padding, m [MASK], x other special token, s span, f freed (in that
        precedence)."""
        special = self.special if self.special is not None else torch.zeros_like(self.masked)
        out = []
        for a, f, s, e, m, x in zip(self.anchors.tolist(), self.freed.tolist(), self.span.tolist(),
                                    self.ended.tolist(), self.masked.tolist(), special.tolist()):
            out.append("a" if a else "e" if e else "m" if m else "x" if x else "s" if s else "f" if f else "?")
        return "".join(out)


def free_spans(text: str, rule: str = "inside") -> list[tuple[int, int]]:
    """Character intervals [start, end) of ``text`` that the ``answer_*`` strategies always free (non-empty, sorted).

    ``inside`` (the STP authors' rule): the text strictly between each ``<answer>`` and the next ``</answer>``, and
    strictly between the braces of each ``\\boxed{...}`` (brace-matched); an unclosed tag or box frees nothing.
    ``inclusive``: each ``<answer>...</answer>`` block with its tags (unclosed: to the end) and each ``\\boxed{...}``
    from the backslash to its brace-matched ``}`` (unclosed: to the end).

    >>> free_spans(r"x \\boxed{a{b}c} y <answer>7</answer>!")
    [(9, 14), (26, 27)]
    >>> free_spans(r"x \\boxed{a{b}c} y <answer>7</answer>!", "inclusive")
    [(2, 15), (18, 36)]
    """
    if rule not in FREE_RULES:
        raise ValueError(f"stp.anchors.free_spans: rule={rule!r}; allowed: {', '.join(FREE_RULES)}")
    inside = rule == "inside"
    open_tag, close_tag, box = "<answer>", "</answer>", "\\boxed{"
    spans = []
    start = 0
    while (i := text.find(open_tag, start)) >= 0:
        j = text.find(close_tag, i + len(open_tag))
        if j < 0:  # no closing tag after this one, hence none after any later opening tag either
            if not inside:
                spans.append((i, len(text)))
            break
        spans.append((i + len(open_tag), j) if inside else (i, j + len(close_tag)))
        start = j + len(close_tag)
    start = 0
    while (i := text.find(box, start)) >= 0:
        depth, k = 0, i + len(box) - 1
        close = -1
        while k < len(text):
            if text[k] == "{":
                depth += 1
            elif text[k] == "}":
                depth -= 1
                if depth == 0:
                    close = k
                    break
            k += 1
        if close >= 0:
            spans.append((i + len(box), close) if inside else (i, close + 1))
        elif not inside:
            spans.append((i, len(text)))
        start = i + len(box)
    return sorted(sp for sp in spans if sp[1] > sp[0])


def special_token_ids(tokenizer) -> set[int]:
    """Every special token id of a tokenizer: ``all_special_ids`` and each added token flagged special (what
    ``decode(..., skip_special_tokens=True)`` drops)."""
    ids = {int(t) for t in (getattr(tokenizer, "all_special_ids", None) or [])}
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(t) for t, tok in added.items() if getattr(tok, "special", False))
    return ids


def _token_char_spans(ids: list[int], tokenizer, skip: set[int] | frozenset = frozenset()
                      ) -> tuple[str, list[tuple[int, int]]]:
    """(decoded text, [start, end) character interval of each token): from the decodings of every prefix, so it
    holds for any tokenizer (byte-level BPE included), not only those with offset mappings. Tokens in ``skip`` are
    left out of the text (zero width)."""
    kwargs = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    prefixes = tokenizer.batch_decode([[t for t in ids[:k] if t not in skip] for k in range(len(ids) + 1)],
                                      **kwargs)
    bounds = [len(p) for p in prefixes]
    for k in range(1, len(bounds)):  # a partial multi-byte character may shorten a prefix: keep them monotone
        bounds[k] = max(bounds[k], bounds[k - 1])
    return prefixes[-1], [(bounds[k], bounds[k + 1]) for k in range(len(ids))]


def _random_scores(seed: int, sample_id: int, length: int) -> torch.Tensor:
    """Uniforms in (0, 1) per position from (seed, sample id, position): the counter RNG, no global state."""
    keys = row_keys(int(seed), _RANDOM_STEP, torch.tensor([int(sample_id)], dtype=torch.long))
    return counter_uniform(keys, torch.arange(length, dtype=torch.long))[0]


def check_rho_strategy(rho, strategy, fn: str, free_rule: str = "inside") -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"{fn}: strategy={strategy!r}; allowed: {', '.join(STRATEGIES)}")
    if free_rule not in FREE_RULES:
        raise ValueError(f"{fn}: free_rule={free_rule!r}; allowed: {', '.join(FREE_RULES)}")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 <= rho <= 1:
        raise ValueError(f"{fn}: rho={rho!r}; allowed: a number in [0, 1]")


def select_anchors(scores, completion_ids, tokenizer=None, *, rho: float, strategy: str, seed: int = 0,
                   sample_id: int = 0, eos_token_id: int | None = None, mask_token_id: int | None = None,
                   free_rule: str = "inside", special_ids: Collection[int] | None = None) -> Selection:
    """Choose the anchors of one completion (pure: no model, no global RNG).

    Args:
        scores: [L] one-step log-probabilities log p(s_i | prompt, all masked) (any float sequence; unused by the
            random strategies).
        completion_ids: [L] the completion's token ids (the whole canvas, EOS padding included).
        tokenizer: decodes the content to find ``<answer>`` and ``\\boxed{}`` spans (needed by ``answer_*``
            strategies); also supplies the default EOS and mask ids.
        rho: fraction of the eligible positions to free (the paper's rho; anchors = the rest).
        strategy: one of ``STRATEGIES``.
        seed, sample_id: key of the random strategies' counter RNG (the CLI uses ``sample_id_of(prompt_id)``).
        eos_token_id, mask_token_id: default to the tokenizer's.
        free_rule: ``inside`` (the STP authors' rule) or ``inclusive``: what the ``answer_*`` strategies always
            free (module docstring).
        special_ids: token ids never anchored and not counted in ``n_rest`` besides EOS and [MASK] (default: every
            special token of the tokenizer, :func:`special_token_ids`).
    """
    fn = "stp.anchors.select_anchors"
    check_rho_strategy(rho, strategy, fn, free_rule)
    ids = torch.as_tensor(completion_ids, dtype=torch.long).flatten().cpu()
    length = ids.numel()
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    if mask_token_id is None:
        mask_token_id = getattr(tokenizer, "mask_token_id", None)
    pos = torch.arange(length)
    ended = torch.zeros(length, dtype=torch.bool)
    valid_length = length
    if eos_token_id is not None:
        hits = (ids == int(eos_token_id)).nonzero()
        if hits.numel():
            valid_length = int(hits[0, 0]) + 1
            ended = pos >= valid_length - 1
    masked = (ids == int(mask_token_id)) if mask_token_id is not None else torch.zeros(length, dtype=torch.bool)
    if special_ids is None:
        special_ids = special_token_ids(tokenizer) if tokenizer is not None else set()
    special_ids = {int(t) for t in special_ids}
    special = torch.tensor([t in special_ids for t in ids.tolist()], dtype=torch.bool) & ~ended & ~masked
    span = torch.zeros(length, dtype=torch.bool)
    content = valid_length - 1 if bool(ended.any()) else length  # positions before the first EOS
    if strategy.startswith("answer_") and content > 0:
        if tokenizer is None:
            raise ValueError(f"{fn}: strategy {strategy!r} needs a tokenizer to find <answer> and \\boxed{{}} spans")
        inside = free_rule == "inside"
        text, tok_spans = _token_char_spans(ids[:content].tolist(), tokenizer, special_ids if inside else frozenset())
        for a, b in free_spans(text, free_rule):
            for k, (s, e) in enumerate(tok_spans):
                if s < b and e > a:  # the token's characters overlap the span
                    span[k] = True
                elif s == e and (a < s <= b if inside else a <= s < b):
                    # A zero-width token (e.g. the last bytes of a character split over several tokens, whose
                    # earlier token already took the character): inside when the character ending at it is.
                    span[k] = True
    eligible = ~ended & ~masked & ~special & ~span
    n_rest = int(eligible.sum())
    n_free = int(n_rest * rho)
    if strategy.endswith("random"):
        key = _random_scores(seed, sample_id, length).double()
    else:
        if scores is None:
            raise ValueError(f"{fn}: strategy {strategy!r} needs scores (one per completion token)")
        key = torch.as_tensor(scores, dtype=torch.float64).flatten().cpu()
        if key.numel() != length:
            raise ValueError(f"{fn}: scores has {key.numel()} entries, completion_ids {length}")
        key = torch.nan_to_num(key, nan=-math.inf)
    cand = pos[eligible]
    order = cand[torch.argsort(key[eligible], stable=True)]  # ascending score, ties by position
    freed = torch.zeros(length, dtype=torch.bool)
    freed[order[:n_free]] = True
    anchors = eligible & ~freed
    return Selection(anchors=anchors, span=span, ended=ended, masked=masked, freed=freed,
                     valid_length=valid_length, n_rest=n_rest, special=special)
