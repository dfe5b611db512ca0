"""The semantic cache, pure: which chat requests it may answer, what must match, and the index.

A tenant with ``cache: semantic`` gets the exact response cache (``cache.py``) and, when that misses,
this one. It answers a chat request from a cached answer to a question worded differently, under
rules meant to never serve a wrong answer:

- only where the exact cache may be used (``cache.deterministic``), on ``chat/completions``, never
  with tools, ``n > 1``, images, audio or files, and only for conversations of at most
  ``max_messages`` messages whose last message is the user's text;
- every message but the last, and every other request field, must be *identical* to the cached
  entry's (``Question.prefix``, a digest that also names the embeddings model and its dimensions);
- the last user message must be close in meaning: the dot product of the two normalised embeddings
  at least ``threshold``;
- and it must carry the same *marks* (``marks``): the numbers, identifiers (order ids, SKUs,
  e-mails), negations and mid-sentence capitalised names. "Where is order 1042?" and "Where is
  order 1043?" are close for any embedding model; they never share an answer here.

An embedding is a budgeted call charged to the tenant, so it is made only when it can pay for
itself (``pays_off``). The index (``TenantIndex``) holds each entry's vector and what must match;
the answers stay in the store.

numpy is imported by the functions that use it, on first use, never at start-up: it costs a worker
~12 MB and ~0.1 s, starts OpenBLAS's threads (which ``serve --workers`` must not have before it forks),
and only tenants with ``cache: semantic`` need it (``tests/unit/test_startup_imports.py``).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import KeysView, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from guardproxy.budget.pricing import TOKENS_PER_PRICE_UNIT, Price, Usage, cost_micros
from guardproxy.http import cache

if TYPE_CHECKING:
    import numpy as np

#: The entry's format; a new one changes every prefix, so old entries are never misread.
FORMAT = "sv1"
#: An embedding pays for itself when it costs at most this share of what a hit saves at the least.
PAYOFF_SHARE = 2
#: Tenants whose index a process keeps in memory at once (least recently used dropped first).
MAX_TENANT_INDEXES = 64
#: What an entry's id, prefix and marks take in memory at most, about (Python strings and tuples).
ENTRY_OVERHEAD_BYTES = 400
#: Message content parts that are text; any other part (images, audio, files) is never cached.
_TEXT_PARTS = frozenset({"text", "input_text"})
#: Request fields that make an answer depend on more than the conversation's words.
_TOOL_FIELDS = ("tools", "functions", "tool_choice", "function_call")


@dataclass(frozen=True)
class Question:
    """A chat request the semantic cache may answer: the last user message and all that must match."""

    #: Digest of everything but the last message's wording (model, parameters, earlier messages).
    prefix: str
    #: The last user message, as embedded.
    text: str
    #: What the cached question must carry too, in the same order (``marks``).
    marks: tuple[str, ...]


def question(
    path: str, body: Mapping[str, Any], headers: Mapping[str, str], *, max_messages: int, embeddings_model: str,
    dimensions: int,
) -> Question | None:
    """The request as a question for the semantic cache, or ``None`` when it may not be answered by one."""
    if path != "chat/completions" or not cache.deterministic(path, body, headers):
        return None
    if any(body.get(name) is not None for name in _TOOL_FIELDS):
        return None
    messages = body.get("messages")
    if not isinstance(messages, list) or not 0 < len(messages) <= max_messages:
        return None
    if any(not _plain(m) for m in messages):
        return None
    last = messages[-1]
    if last.get("role") != "user":
        return None
    text = _text_of(last.get("content")).strip()
    if not text:
        return None
    head = {**body, "messages": messages[:-1]}
    digest = hashlib.sha256(f"{FORMAT}\n{embeddings_model}\n{dimensions}\n".encode())
    digest.update(cache.canonical_body(head))
    return Question(digest.hexdigest(), text, marks(text))


def _plain(message: Any) -> bool:
    """A message of text only: no tool call or result, no image, audio or file part."""
    if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
        return False
    if message.get("tool_calls") or message.get("function_call") or message.get("audio"):
        return False
    content = message.get("content")
    if isinstance(content, list):
        return all(isinstance(p, dict) and p.get("type") in _TEXT_PARTS for p in content)
    return content is None or isinstance(content, str)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


# -- the lexical guard ---------------------------------------------------------------------------

_APOSTROPHE = "\u2019"  # typographic, as phones type it
_WORD = re.compile(r"[\w][\w'\u2019@.#/-]*")
_NEGATIONS = frozenset({
    "not", "no", "never", "none", "nobody", "nothing", "neither", "nor", "without", "cannot", "nowhere",
    "dont", "doesnt", "didnt", "isnt", "arent", "wasnt", "werent", "cant", "couldnt", "wont", "wouldnt",
    "shouldnt", "hasnt", "havent", "hadnt",
})
_NUMBER_WORDS = frozenset({
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty", "thirty",
    "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred", "thousand", "million", "billion",
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "half",
    "double", "twice", "once", "dozen",
})
#: Capitalised in any position without being a name.
_ALWAYS_CAPITALISED = frozenset({"i", "i'm", "i've", "i'll", "i'd", "ok", "okay"})


def marks(text: str) -> tuple[str, ...]:
    """What two questions must share, in the same order, to share an answer, whatever their embeddings
    say: tokens with a digit (numbers, order ids, SKUs, dates), e-mail addresses, number words,
    negations (``not`` for any form), and capitalised words that do not start a sentence (names),
    lowercased. In order: "refund 771, cancel 772" and "refund 772, cancel 771" do not match."""
    found: list[str] = []
    for match in _WORD.finditer(text):
        raw = match.group().rstrip(".'/#-@" + _APOSTROPHE)
        word = raw.lower().replace(_APOSTROPHE, "'").removesuffix("'s")  # Maria's: maria
        before = text[:match.start()].rstrip()
        sentence_start = not before or before[-1] in ".?!:;\n\"("
        bare = re.sub(r"[^0-9a-z]", "", word)
        if any(c.isdigit() for c in word) or "@" in word:
            found.append(bare or word)
        elif word.endswith("n't") or bare in _NEGATIONS:
            found.append("not")
        elif bare in _NUMBER_WORDS or (raw[:1].isupper() and not sentence_start and word not in _ALWAYS_CAPITALISED):
            found.append(bare)
    return tuple(found)


# -- the pay-off rule ----------------------------------------------------------------------------


def pays_off(embedding_tokens: int, embedding_price: Price, prompt_tokens: int, model_price: Price) -> bool:
    """Whether embedding the question is worth its price: the embedding (as charged, rounded up to a
    whole micro-USD) must cost at most half of what a hit saves at the very least, the call's prompt at
    the model's input price (its output, usually dearer, comes on top). Short prompts to a cheap model
    fail it (an embedding is charged at least one micro-USD), and so does an unpriced (free) model."""
    charged = cost_micros(Usage(embedding_tokens, 0), embedding_price)
    least_saving_scaled = prompt_tokens * model_price.input  # micro-USD * TOKENS_PER_PRICE_UNIT
    return PAYOFF_SHARE * charged * TOKENS_PER_PRICE_UNIT <= least_saving_scaled


# -- calibration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """One pair of an evaluation set: its similarity, whether the marks match, and the truth."""

    similarity: float
    marks_match: bool
    paraphrase: bool


def false_hits(pairs: Sequence[Scored], threshold: float, *, guard: bool = True) -> list[Scored]:
    """The non-paraphrases that would share an answer at ``threshold`` (with the marks guard, or not)."""
    return [p for p in pairs if not p.paraphrase and p.similarity >= threshold and (p.marks_match or not guard)]


def recall(pairs: Sequence[Scored], threshold: float, *, guard: bool = True) -> float:
    """The share of the paraphrases that would share an answer at ``threshold``."""
    same = [p for p in pairs if p.paraphrase]
    hits = [p for p in same if p.similarity >= threshold and (p.marks_match or not guard)]
    return len(hits) / len(same) if same else 0.0


def safe_threshold(pairs: Sequence[Scored], *, guard: bool = False, margin: float = 0.01) -> float:
    """The least threshold giving no false hit, ``margin`` above the closest non-paraphrase (at least 0.5)."""
    worst = max((p.similarity for p in pairs if not p.paraphrase and (p.marks_match or not guard)), default=0.0)
    return min(1.0, max(0.5, round(worst + margin, 4)))


# -- vectors --------------------------------------------------------------------------------------


def normalised(vector: Sequence[float] | np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.float32]]:
    """``vector`` as float32 of length 1 (a zero vector stays zero: it matches nothing)."""
    import numpy as np  # here, not at the top: see the module's note on numpy

    array = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(array))
    return array / norm if norm > 0 else array


def vector_from_wire(value: Any) -> np.ndarray[Any, np.dtype[np.float32]] | None:
    """An embedding as the upstream sent it (a list of floats, or base64 little-endian float32)."""
    import numpy as np  # here, not at the top: see the module's note on numpy

    try:
        if isinstance(value, str):
            return np.frombuffer(base64.b64decode(value, validate=True), dtype="<f4").astype(np.float32)
        if isinstance(value, list) and all(isinstance(x, int | float) and not isinstance(x, bool) for x in value):
            return np.asarray(value, dtype=np.float32)
    except ValueError:
        return None
    return None


def embedding_of(answer: Any, dimensions: int) -> np.ndarray[Any, np.dtype[np.float32]] | None:
    """The one vector of an embeddings answer, normalised; ``None`` unless it has ``dimensions`` finite numbers."""
    import numpy as np  # here, not at the top: see the module's note on numpy

    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list) or len(data) != 1 or not isinstance(data[0], dict):
        return None
    vector = vector_from_wire(data[0].get("embedding"))
    if vector is None or vector.shape != (dimensions,) or not np.all(np.isfinite(vector)):
        return None
    return normalised(vector)


@dataclass(frozen=True)
class Embedded:
    """A question the semantic cache missed, with its embedding: stored with the answer the call gets."""

    question: Question
    vector: np.ndarray[Any, np.dtype[np.float32]]


# -- entries -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexEntry:
    """What a replica keeps in memory of one cached question (its answer stays in the store)."""

    id: str
    prefix: str
    marks: tuple[str, ...]
    vector: np.ndarray[Any, np.dtype[np.float32]]
    created_ms: int

    def to_bytes(self) -> bytes:
        return orjson.dumps({"p": self.prefix, "m": list(self.marks), "t": self.created_ms,
                             "v": base64.b64encode(self.vector.astype("<f4").tobytes()).decode()})

    @classmethod
    def from_bytes(cls, entry_id: str, raw: bytes) -> IndexEntry | None:
        """``None`` for anything that is not an entry (never an error: a bad entry is no entry)."""
        import numpy as np

        try:
            value = orjson.loads(raw)
            vector = np.frombuffer(base64.b64decode(value["v"], validate=True), dtype="<f4").astype(np.float32)
            return cls(entry_id, str(value["p"]), tuple(str(m) for m in value["m"]), vector, int(value["t"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class Found:
    """The closest cached question that may share its answer, and how close it is."""

    id: str
    similarity: float


class TenantIndex:
    """One tenant's cached questions in this process: an exact dot-product search over a fixed block
    of ``capacity`` rows (``capacity * dimensions * 4`` bytes), the oldest entry replaced when full.

    ``version`` is the store's counter of the tenant's entries when this index was last brought up to
    date (``None``: never)."""

    def __init__(self, capacity: int, dimensions: int) -> None:
        import numpy as np

        self.capacity = capacity
        self.dimensions = dimensions
        self.version: int | None = None
        self._rows = np.zeros((capacity, dimensions), dtype=np.float32)
        self._created = np.zeros(capacity, dtype=np.int64)
        self._group = np.full(capacity, -1, dtype=np.int64)  # the prefix's code; -1: a free row
        # Per row: the entry's id, prefix and marks (its vector is the row).
        self._entries: list[tuple[str, str, tuple[str, ...]] | None] = [None] * capacity
        self._slot: dict[str, int] = {}
        self._codes: dict[str, int] = {}
        self._next_code = 0
        #: The creation time of the newest entry ever added (ms).
        self.newest_ms = 0

    def __len__(self) -> int:
        return len(self._slot)

    @property
    def ids(self) -> KeysView[str]:
        """The ids of the entries held (a view: no copy)."""
        return self._slot.keys()

    @property
    def nbytes(self) -> int:
        """The memory the index holds, for ``/metrics``: its arrays, and an estimate of each entry's
        id, prefix and marks (shared prefixes are counted once per entry: an upper bound)."""
        arrays = self._rows.nbytes + self._created.nbytes + self._group.nbytes + 8 * self.capacity
        return arrays + ENTRY_OVERHEAD_BYTES * len(self._slot)

    def add(self, entry: IndexEntry) -> None:
        """Keep ``entry`` (a wrong-sized vector is not kept); when full, in place of the oldest one."""
        import numpy as np

        if entry.id in self._slot or entry.vector.shape != (self.dimensions,):
            return
        if len(self._slot) < self.capacity:
            row = int(np.flatnonzero(self._group < 0)[0])  # a free row
        else:
            row = int(np.argmin(np.where(self._group >= 0, self._created, np.iinfo(np.int64).max)))
            self._drop(row)
        if entry.prefix not in self._codes and len(self._codes) >= 2 * self.capacity:
            self._recode()
        code = self._codes.get(entry.prefix)
        if code is None:
            code = self._codes[entry.prefix] = self._next_code
            self._next_code += 1
        self._rows[row] = normalised(entry.vector)
        self._created[row] = entry.created_ms
        self._group[row] = code
        self._entries[row] = (entry.id, entry.prefix, entry.marks)
        self._slot[entry.id] = row
        self.newest_ms = max(self.newest_ms, entry.created_ms)

    def _recode(self) -> None:
        """Forget the codes of prefixes no entry has any more (they would grow without bound)."""
        live = {e[1] for e in self._entries if e is not None}
        self._codes = {prefix: code for prefix, code in self._codes.items() if prefix in live}
        # Codes of live prefixes stay as they are; new ones take numbers above every kept one.
        self._next_code = max(self._codes.values(), default=-1) + 1

    def _drop(self, row: int) -> None:
        entry = self._entries[row]
        if entry is not None:
            del self._slot[entry[0]]
        self._entries[row] = None
        self._group[row] = -1

    def search(self, q: Question, vector: np.ndarray[Any, np.dtype[np.float32]], threshold: float,
               not_before_ms: int) -> Found | None:
        """The most similar entry with the same prefix and marks, created at or after ``not_before_ms``,
        if its similarity reaches ``threshold``."""
        import numpy as np

        code = self._codes.get(q.prefix)
        if code is None or vector.shape != (self.dimensions,):
            return None
        # einsum, not ``@``: a matrix-vector product goes to OpenBLAS, whose threads sleep between calls
        # and take 20+ ms to wake on a busy host (bench/semantic_cache.py); einsum's own loop takes
        # ~0.15 ms over 2,000 x 256 on one core, every time.
        scores = np.einsum("ij,j->i", self._rows, normalised(vector))
        eligible = (self._group == code) & (self._created >= not_before_ms) & (scores >= threshold)
        # Best first; a candidate whose marks differ is skipped, never an answer.
        for row in np.flatnonzero(eligible)[np.argsort(-scores[eligible], kind="stable")]:
            entry = self._entries[int(row)]
            if entry is not None and entry[2] == q.marks:
                return Found(entry[0], float(scores[row]))
        return None
