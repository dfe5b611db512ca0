"""The fake upstream's embeddings: deterministic, offline, and close for paraphrases.

Not a language model: a signed feature hash of the text's words (contractions expanded, so "where's"
is "where is"), of their character trigrams (so "orders" is near "order"), with filler words
("please", "can you") weighted down and the words that change an answer (numbers, identifiers,
negations) weighted up, normalised to length 1. Paraphrases that reorder or reword a few filler
words land close together; questions that differ by an order id or a "not" land far apart. Tests of
the semantic cache run on it; a real model is calibrated as docs/semantic-cache.md says.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re

_CONTRACTIONS = (
    (re.compile(r"\b(can)'t\b"), r"\1 not"), (re.compile(r"\bwon't\b"), "will not"),
    (re.compile(r"n't\b"), " not"), (re.compile(r"'s\b"), " is"), (re.compile(r"'re\b"), " are"),
    (re.compile(r"'m\b"), " am"), (re.compile(r"'ve\b"), " have"), (re.compile(r"'ll\b"), " will"),
    (re.compile(r"'d\b"), " would"), (re.compile(r"\bcannot\b"), "can not"),
    # The same without the apostrophe, as people type them.
    (re.compile(r"\b(do|does|did|is|are|was|were|could|would|should|has|have|had)nt\b"), r"\1 not"),
    (re.compile(r"\bcant\b"), "can not"), (re.compile(r"\bwont\b"), "will not"),
)
_WORD = re.compile(r"[a-z0-9@#._-]*[a-z0-9]")
_FILLER = frozenset({
    "a", "an", "the", "please", "pls", "can", "could", "would", "will", "you", "me", "my", "i", "is", "are",
    "am", "be", "do", "does", "did", "to", "of", "for", "in", "on", "at", "hi", "hello", "hey", "thanks",
    "thank", "there", "it", "this", "that", "just", "kindly", "tell", "let", "know", "want", "like", "some",
    "any",
})
_NEGATIONS = frozenset({"not", "no", "never", "without", "none", "nothing"})


def embed_text(text: str, dimensions: int) -> list[float]:
    """A vector of ``dimensions`` floats of length 1 (all zero for a text without words)."""
    vector = [0.0] * dimensions
    lowered = text.lower().replace("\u2019", "'")
    for pattern, replacement in _CONTRACTIONS:
        lowered = pattern.sub(replacement, lowered)
    words = _WORD.findall(lowered)
    # Word pairs, so that order counts: "refund 771, cancel 772" is not "refund 772, cancel 771".
    for first, second in itertools.pairwise(words):
        _add(vector, f"b:{first} {second}", 3.0 if _weighty(first) or _weighty(second) else 0.3)
    for word in words:
        if _weighty(word):
            _add(vector, f"w:{word}", 4.0)
            continue
        weight = 0.25 if word in _FILLER else 1.0
        _add(vector, f"w:{word}", weight)
        padded = f"<{word}>"
        for i in range(len(padded) - 2):
            _add(vector, f"c:{padded[i:i + 3]}", 0.35 * weight)
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 0 else vector


def _weighty(word: str) -> bool:
    """A word that changes the answer: a number, an identifier, an address, a negation."""
    return any(c.isdigit() for c in word) or "@" in word or word in _NEGATIONS


def _add(vector: list[float], feature: str, weight: float) -> None:
    h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
    vector[h % len(vector)] += weight if (h >> 63) & 1 else -weight
