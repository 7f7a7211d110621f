"""Generated long-range tasks: passkey retrieval and multi-query associative recall (MQAR).

Everything here is a pure function of a seed (``numpy.random.Generator``), so the same documents
come out on every machine: tests that must be bit-identical use ``source: synthetic``.

Passkey (Landmark Attention / LongLoRA protocol): the filler "The grass is green. The sky is blue. The sun is
yellow. Here we go. There and back again." repeated, "The pass key is N. Remember it. N is the pass
key." inserted at a random depth, N in [1, 50000], then the question and the answer.
MQAR: key–value pairs ("the amber river is 4821."), then queries of a random subset of the keys,
each followed by its value.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "FILLER",
    "PasskeySample",
    "RecallSample",
    "make_passkey",
    "make_recall",
    "make_sentences",
    "passkey_prompt",
    "synthetic_documents",
]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

_ADJECTIVES = ("amber", "bright", "calm", "dark", "eager", "faint", "gentle", "happy", "icy", "jolly",
               "kind", "lazy", "merry", "noble", "odd", "proud", "quiet", "rapid", "silent", "tall",
               "urban", "vast", "warm", "young", "zesty", "bold", "brave", "cold", "deep", "early")
_NOUNS = ("river", "mountain", "garden", "window", "forest", "bridge", "castle", "harbor", "meadow",
          "island", "valley", "lantern", "engine", "library", "market", "orchard", "village", "tower",
          "desert", "ocean", "planet", "signal", "shadow", "ladder", "mirror", "candle", "compass", "anchor")
_SUBJECTS = ("The farmer", "A child", "The old sailor", "My neighbour", "The teacher", "A small dog",
             "The engineer", "Our guide", "The baker", "A traveller", "The doctor", "The painter")
_VERBS = ("sees", "builds", "paints", "finds", "visits", "remembers", "describes", "crosses", "repairs",
          "watches", "leaves", "reaches")
_ENDINGS = ("before sunrise", "in the evening", "after the rain", "every winter", "with great care",
            "for the first time", "without a word", "near the road", "at noon", "once again")


@dataclass(frozen=True)
class PasskeySample:
    """A passkey-retrieval document.

    Attributes:
        text: the whole document (prompt followed by ``" " + answer + "."``).
        prompt: everything up to and including the question (a model should continue with the answer).
        answer: the pass key as text.
        depth: relative position of the key sentence among the filler repeats, in [0, 1].
    """

    text: str
    prompt: str
    answer: str
    depth: float


@dataclass(frozen=True)
class RecallSample:
    """A multi-query associative-recall document: pairs, then queries answered by their values."""

    text: str
    pairs: tuple[tuple[str, int], ...]
    queries: tuple[str, ...]


def passkey_prompt(num_filler: int, depth: float, key: int) -> PasskeySample:
    """The passkey document with ``num_filler`` filler repeats and the key sentence at ``depth``.

    Args:
        num_filler: number of filler repeats (sets the length; ~22 tokens each with a small vocabulary).
        depth: where the key sentence goes, as a fraction of the filler repeats (0 = start, 1 = end).
        key: the pass key (LongLoRA's protocol: random in [1, 50000]).

    Returns:
        The sample; ``prompt`` ends with "The pass key is" and ``answer`` is ``str(key)``.
    """
    if num_filler < 0:
        raise ValueError(f"num_filler must be >= 0, got {num_filler}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    at = int(round(depth * num_filler))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    head = " ".join([FILLER] * at)
    tail = " ".join([FILLER] * (num_filler - at))
    body = " ".join(part for part in (head, needle, tail) if part)
    intro = "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it."
    prompt = f"{intro} {body} {PASSKEY_QUESTION}"
    answer = str(key)
    return PasskeySample(text=f"{prompt} {answer}.", prompt=prompt, answer=answer, depth=depth)


def make_passkey(rng: np.random.Generator, max_chars: int) -> PasskeySample:
    """A passkey document of random length (up to ~``max_chars`` characters), depth and key."""
    per = len(FILLER) + 1
    num_filler = int(rng.integers(1, max(2, max_chars // per) + 1))
    depth = float(rng.integers(0, 101)) / 100.0
    key = int(rng.integers(1, 50001))
    return passkey_prompt(num_filler, depth, key)


def make_recall(rng: np.random.Generator, max_chars: int) -> RecallSample:
    """An MQAR document: ``n`` distinct key–value pairs, then queries of a random subset of keys.

    Keys are adjective–noun phrases, values integers in [0, 9999]; the document fits in about
    ``max_chars`` characters.
    """
    max_pairs = len(_ADJECTIVES) * len(_NOUNS)
    n = int(rng.integers(2, max(3, min(max_pairs, max_chars // 60)) + 1))
    flat = rng.choice(max_pairs, size=n, replace=False)
    keys = [f"{_ADJECTIVES[i // len(_NOUNS)]} {_NOUNS[i % len(_NOUNS)]}" for i in flat]
    values = [int(v) for v in rng.integers(0, 10000, size=n)]
    pairs = tuple(zip(keys, values))
    n_q = int(rng.integers(1, n + 1))
    order = rng.permutation(n)[:n_q]
    queries = tuple(keys[i] for i in order)
    lines = ["Remember the following facts."]
    lines += [f"The {k} is {v}." for k, v in pairs]
    lines.append("Now answer the questions.")
    lines += [f"What is the {keys[i]}? The {keys[i]} is {values[i]}." for i in order]
    return RecallSample(text=" ".join(lines), pairs=pairs, queries=queries)


def make_sentences(rng: np.random.Generator, max_chars: int) -> str:
    """Plain generated English (templated sentences) of random length up to ~``max_chars``."""
    n = int(rng.integers(2, max(3, max_chars // 45) + 1))
    out = []
    for _ in range(n):
        s = _SUBJECTS[rng.integers(len(_SUBJECTS))]
        v = _VERBS[rng.integers(len(_VERBS))]
        a = _ADJECTIVES[rng.integers(len(_ADJECTIVES))]
        o = _NOUNS[rng.integers(len(_NOUNS))]
        e = _ENDINGS[rng.integers(len(_ENDINGS))]
        out.append(f"{s} {v} the {a} {o} {e}.")
    return " ".join(out)


def synthetic_documents(count: int, *, seed: int, passkey_fraction: float, recall_fraction: float,
                        max_chars: int) -> list[str]:
    """``count`` generated documents: passkey, MQAR and plain sentences in the given proportions.

    The kinds are laid out by exact counts (rounded) and interleaved in a seeded random order, so the
    mix is the same for every seed; the contents differ per seed.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    n_pass = int(round(count * passkey_fraction))
    n_rec = int(round(count * recall_fraction))
    n_pass = min(n_pass, count)
    n_rec = min(n_rec, count - n_pass)
    kinds = np.array([0] * n_pass + [1] * n_rec + [2] * (count - n_pass - n_rec), dtype=np.int8)
    kinds = kinds[rng.permutation(count)]
    docs = []
    for kind in kinds:
        if kind == 0:
            docs.append(make_passkey(rng, max_chars).text)
        elif kind == 1:
            docs.append(make_recall(rng, max_chars).text)
        else:
            docs.append(make_sentences(rng, max_chars))
    return docs


def task_documents(count: int, *, seed: int, passkey_fraction: float, recall_fraction: float,
                   max_chars: int) -> list[str]:
    """``count`` generated task documents only (passkey and MQAR in the ratio of the two fractions)."""
    total = passkey_fraction + recall_fraction
    if count <= 0 or total <= 0:
        return []
    share = passkey_fraction / total
    return synthetic_documents(count, seed=seed, passkey_fraction=share, recall_fraction=1.0 - share,
                               max_chars=max_chars)
