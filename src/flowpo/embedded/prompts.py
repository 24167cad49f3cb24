"""Prompts for the embedded digit model: templates, a word tokenizer, and prompt → digit parsing.

Training templates are what the embedded flow model was pretrained on; held-out templates use
other phrasings (their content words are mostly outside `VOCAB` and map to UNK) and are used only
for evaluation, so a reward gain on them is a gain that generalises beyond the training prompts.
The digit itself (numeral "7" or word "seven") is always in the vocabulary and carries the meaning.

Tokenization: lower-case, split into runs of letters or digits, map each word to its id in `VOCAB`
(UNK = 1 when unknown), cut to `max_len` and right-pad with PAD = 0. The null prompt for
classifier-free guidance is an all-PAD row (`null_tokens`).
"""
from __future__ import annotations

import random
import re

import torch

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMERALS = tuple(str(d) for d in range(10))

# {n}: numeral "7", {w}: word "seven"
TRAIN_TEMPLATES = (
    "a handwritten {n}",
    "the digit {w}",
    "number {n}",
    "a picture of a {n}",
    "the number {w}",
    "digit {n}",
    "a handwritten {w}",
    "an image of the digit {w}",
)
HELDOUT_TEMPLATES = (
    "a drawing of the number {w}",
    "handwritten digit {n} on paper",
    "a sketch showing {w}",
    "please draw a {n}",
    "an old scan of a {w}",
    "the numeral {n} written by hand",
)

PAD, UNK = 0, 1
_WORD = re.compile(r"[a-z]+|[0-9]+")


def _words(prompt: str) -> list[str]:
    return _WORD.findall(prompt.lower())


def _build_vocab() -> dict[str, int]:
    words = list(NUMERALS) + list(NUMBER_WORDS)
    template_words = sorted({w for t in TRAIN_TEMPLATES for w in _words(t.format(n="", w=""))})
    words += [w for w in template_words if w not in words]
    return {"<pad>": PAD, "<unk>": UNK, **{w: i + 2 for i, w in enumerate(words)}}


VOCAB: dict[str, int] = _build_vocab()
_DIGIT_OF_WORD = {**{n: d for d, n in enumerate(NUMERALS)}, **{w: d for d, w in enumerate(NUMBER_WORDS)}}


def _fill(templates: tuple[str, ...], digit: int) -> list[str]:
    if digit not in range(10):
        raise ValueError(f"digit must be an int in 0..9, got {digit!r}")
    return [t.format(n=NUMERALS[digit], w=NUMBER_WORDS[digit]) for t in templates]


def train_prompts(digit: int) -> list[str]:
    """The training-template prompts for `digit`."""
    return _fill(TRAIN_TEMPLATES, digit)


def heldout_prompts(digit: int) -> list[str]:
    """The held-out (evaluation-only) prompts for `digit`."""
    return _fill(HELDOUT_TEMPLATES, digit)


def prompt_digit(prompt: str) -> int:
    """The digit a prompt asks for, from a numeral ("7") or a number word ("seven").

    Raises ValueError if the prompt names no digit or several different ones.
    """
    found = {_DIGIT_OF_WORD[w] for w in _words(prompt) if w in _DIGIT_OF_WORD}
    if len(found) != 1:
        what = "no digit" if not found else f"several digits {sorted(found)}"
        raise ValueError(f"prompt {prompt!r} names {what}; expected exactly one of 0-9 or zero-nine")
    return found.pop()


def sample_prompts(rng: torch.Generator | random.Random, n: int, split: str = "train") -> list[str]:
    """`n` prompts drawn uniformly over (digit, template) of `split` ("train" or "heldout").

    Deterministic given the generator's state (which it advances).
    """
    templates = {"train": TRAIN_TEMPLATES, "heldout": HELDOUT_TEMPLATES}.get(split)
    if templates is None:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    k = 10 * len(templates)
    if isinstance(rng, random.Random):
        idx = [rng.randrange(k) for _ in range(n)]
    else:
        idx = torch.randint(k, (n,), generator=rng).tolist()
    return [_fill((templates[i % len(templates)],), i // len(templates))[0] for i in idx]


def tokenize(prompts: list[str], max_len: int = 8) -> torch.Tensor:
    """Word ids, right-padded with PAD and cut to `max_len`: LongTensor [N, L=max_len]."""
    out = torch.full((len(prompts), max_len), PAD, dtype=torch.long)  # [N, L]
    for i, p in enumerate(prompts):
        ids = [VOCAB.get(w, UNK) for w in _words(p)][:max_len]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def null_tokens(n: int, max_len: int = 8) -> torch.Tensor:
    """The null (unconditional) prompt for classifier-free guidance: all PAD, [N, L]."""
    return torch.full((n, max_len), PAD, dtype=torch.long)
