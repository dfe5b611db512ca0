"""The semantic cache's pure part: which requests it may answer, the marks guard, the pay-off rule,
the index, and the committed evaluation set at the default threshold."""

from __future__ import annotations

import base64
import struct
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from guardproxy.budget.pricing import Price
from guardproxy.config.settings import SemanticCacheConfig
from guardproxy.http import semantic
from guardproxy.http.semantic import IndexEntry, Scored, TenantIndex
from guardproxy.testing.fake_embedding import embed_text

PAIRS = Path(__file__).parent.parent / "data" / "semantic_pairs.jsonl"
DIMENSIONS = SemanticCacheConfig.dimensions
THRESHOLD = SemanticCacheConfig.threshold


def ask(text: str, *history: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "temperature": 0, "messages": [*history, {"role": "user", "content": text}],
            **fields}


def question(body: dict[str, Any], headers: dict[str, str] | None = None, max_messages: int = 4
             ) -> semantic.Question | None:
    return semantic.question("chat/completions", body, headers or {}, max_messages=max_messages,
                             embeddings_model="text-embedding-3-small", dimensions=DIMENSIONS)


SYSTEM = {"role": "system", "content": "You answer for Acme's shop."}


def test_a_question_is_the_last_user_message_and_its_prefix_is_everything_else() -> None:
    q = question(ask("Where is my order?", SYSTEM))
    assert q is not None and q.text == "Where is my order?"
    same_prefix = question(ask("where's my order", SYSTEM))
    assert same_prefix is not None and same_prefix.prefix == q.prefix
    # anything else that differs makes another prefix: the system prompt, the model, a parameter
    others = [ask("Where is my order?", {"role": "system", "content": "Other shop."}),
              {**ask("Where is my order?", SYSTEM), "model": "gpt-4o-mini"},
              ask("Where is my order?", SYSTEM, max_tokens=50),
              ask("Where is my order?", SYSTEM, {"role": "assistant", "content": "Hi"})]
    for body in others:
        other = question(body)
        assert other is not None and other.prefix != q.prefix
    # stream and user do not change the answer (as for the exact cache)
    streamed = question(ask("Where is my order?", SYSTEM, stream=True, user="u1"))
    assert streamed is not None and streamed.prefix == q.prefix
    # the embeddings model and its dimensions are part of the prefix: vectors of two models never compare
    other_model = semantic.question("chat/completions", ask("Where is my order?", SYSTEM), {}, max_messages=4,
                                    embeddings_model="text-embedding-3-large", dimensions=DIMENSIONS)
    assert other_model is not None and other_model.prefix != q.prefix


@pytest.mark.parametrize("body", [
    ask("Where is my order?", temperature=0.7),                                      # not deterministic
    ask("Where is my order?", n=2),                                                  # n > 1
    ask("Where is my order?", tools=[{"type": "function", "function": {"name": "f"}}]),  # tools
    ask("Where is my order?", tool_choice="none"),
    ask("Where is my order?", functions=[{"name": "f"}]),
    {"model": "gpt-4o", "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]},  # an image
    {"model": "gpt-4o", "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_id": "file-1"}}]}]},                         # a file
    {"model": "gpt-4o", "temperature": 0, "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "user", "content": "And tomorrow?"}]},                              # a tool result
    {"model": "gpt-4o", "temperature": 0, "messages": [SYSTEM]},                     # last is not the user's
    ask("   "),                                                                      # nothing to embed
    ask("Hi", SYSTEM, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}),                                           # 5 messages > 4
])
def test_what_the_semantic_cache_never_answers(body: dict[str, Any]) -> None:
    assert question(body) is None


def test_the_header_opts_a_non_zero_temperature_in_and_text_parts_count() -> None:
    assert question(ask("Where is my order?", temperature=0.7), {"x-guardproxy-cache": "use"}) is not None
    parts = {"model": "gpt-4o", "temperature": 0, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Where is"}, {"type": "text", "text": "my order"}]}]}
    q = question(parts)
    assert q is not None and q.text == "Where is\nmy order"
    assert semantic.question("responses", {"model": "gpt-4o", "input": "x", "temperature": 0}, {}, max_messages=4,
                             embeddings_model="e", dimensions=8) is None


@pytest.mark.parametrize(("text", "expected"), [
    ("Where is my order?", ()),
    ("Where is order #10452?", ("10452",)),
    ("Status of order A-2291, please", ("a2291",)),
    ("I can't log in", ("not",)),
    ("I cannot log in", ("not",)),
    ("I can\u2019t log in", ("not",)),
    ("I want two pizzas", ("two",)),
    ("Did Maria's order ship?", ("maria",)),
    ("Where is my order? Thanks", ()),                     # a capital after a sentence is not a name
    ("I think I ordered it", ()),                          # "I" is not a name
    ("Email anna@example.com", ("annaexamplecom",)),
    ("Refund 771, cancel 772", ("771", "772")),
])
def test_marks_are_numbers_identifiers_negations_and_names_in_order(text: str, expected: tuple[str, ...]) -> None:
    assert semantic.marks(text) == expected


def test_the_embedding_is_made_only_when_it_pays_for_itself() -> None:
    small = Price(input=20_000, cached_input=20_000, output=0)        # text-embedding-3-small, 0.02 USD/M
    gpt4o = Price(input=2_500_000, cached_input=1_250_000, output=10_000_000)
    mini = Price(input=150_000, cached_input=75_000, output=600_000)
    free = Price(input=0, cached_input=0, output=0)
    assert semantic.pays_off(10, small, 30, gpt4o)          # 1 micro charged <= half of 75 micros
    assert not semantic.pays_off(10, small, 12, mini)       # 1 micro charged > half of 1.8 micros: short, cheap
    assert semantic.pays_off(10, small, 14, mini)           # 2.1 micros: just pays
    assert not semantic.pays_off(10, small, 10_000, free)   # a free model saves nothing
    large = Price(input=130_000, cached_input=130_000, output=0)      # text-embedding-3-large
    nano = Price(input=100_000, cached_input=25_000, output=400_000)
    assert not semantic.pays_off(5000, large, 5000, nano)   # the embedding dearer than the prompt


def entry(entry_id: str, text: str, prefix: str = "p", created_ms: int = 1000) -> IndexEntry:
    vector = np.asarray(embed_text(text, DIMENSIONS), dtype=np.float32)
    return IndexEntry(entry_id, prefix, semantic.marks(text), vector, created_ms)


def find(index: TenantIndex, text: str, prefix: str = "p", not_before_ms: int = 0) -> semantic.Found | None:
    q = semantic.Question(prefix, text, semantic.marks(text))
    return index.search(q, np.asarray(embed_text(text, DIMENSIONS), dtype=np.float32), THRESHOLD, not_before_ms)


def test_the_index_finds_a_paraphrase_under_the_same_prefix_only() -> None:
    index = TenantIndex(4, DIMENSIONS)
    index.add(entry("a", "Where is my order?"))
    index.add(entry("b", "How do I reset my password?"))
    found = find(index, "where's my order")
    assert found is not None and found.id == "a" and found.similarity == pytest.approx(1.0, abs=1e-5)
    assert find(index, "where's my order", prefix="other") is None
    assert find(index, "How do I change my email address?") is None
    # expired entries (created before not_before_ms) are not found
    assert find(index, "where's my order", not_before_ms=1001) is None


def test_a_candidate_with_other_marks_is_never_the_answer_even_when_it_is_the_closest() -> None:
    index = TenantIndex(4, DIMENSIONS)
    index.add(entry("771", "Refund order 771 and cancel order 772"))
    index.add(entry("plain", "Refund order 772 and cancel order 771"))
    # the embeddings are near (the same words), the marks' order differs: only the exact one
    found = find(index, "refund order 772 and cancel order 771 please")
    assert found is not None and found.id == "plain"
    q = semantic.Question("p", "x", ("771", "773"))
    vector = np.asarray(embed_text("Refund order 771 and cancel order 772", DIMENSIONS), dtype=np.float32)
    assert index.search(q, vector, 0.5, 0) is None


def test_the_index_is_bounded_and_replaces_its_oldest_entry() -> None:
    index = TenantIndex(2, DIMENSIONS)
    index.add(entry("old", "Where is my order?", created_ms=1))
    index.add(entry("mid", "How do I reset my password?", created_ms=2))
    index.add(entry("new", "What are your opening hours?", created_ms=3))
    assert index.ids == {"mid", "new"} and len(index) == 2
    assert find(index, "where's my order") is None
    assert index.nbytes == 2 * (DIMENSIONS * 4 + 24) + 2 * semantic.ENTRY_OVERHEAD_BYTES
    assert index.newest_ms == 3
    index.add(entry("new", "What are your opening hours?", created_ms=3))  # re-adding keeps one copy
    index.add(IndexEntry("short", "p", (), np.ones(3, dtype=np.float32), 5))  # another length is refused
    assert index.ids == {"mid", "new"} and index.newest_ms == 3


def test_prefix_codes_do_not_grow_without_bound() -> None:
    index = TenantIndex(2, DIMENSIONS)
    for i in range(50):
        index.add(entry(f"e{i}", "Where is my order?", prefix=f"p{i}", created_ms=i))
    assert len(index._codes) <= 4  # the live prefixes, plus those added since the last recoding
    assert find(index, "where's my order", prefix="p49") is not None
    assert find(index, "where's my order", prefix="p48") is not None
    assert find(index, "where's my order", prefix="p47") is None


def test_entries_round_trip_through_bytes_and_bad_ones_are_none() -> None:
    e = entry("id1", "Where is order 10452?")
    back = IndexEntry.from_bytes("id1", e.to_bytes())
    assert back is not None and back.marks == ("10452",) and back.prefix == "p" and back.created_ms == 1000
    assert np.array_equal(back.vector, e.vector)
    for raw in (b"", b"[]", b"{}", orjson.dumps({"p": "x", "m": [], "t": 1, "v": "%%"})):
        assert IndexEntry.from_bytes("x", raw) is None


def test_embeddings_are_read_from_floats_or_base64_and_checked() -> None:
    vector = embed_text("hello there", 8)
    packed = base64.b64encode(struct.pack("<8f", *vector)).decode()
    for wire in (vector, packed):
        got = semantic.embedding_of({"data": [{"embedding": wire}]}, 8)
        assert got is not None and np.allclose(got, vector, atol=1e-6)
    bad_answers: list[Any] = [{"data": [{"embedding": vector}]}, {"data": []}, {"data": [{"embedding": "%%"}]}, None,
                              {"data": [{"embedding": [float("nan")] * 4}]}]
    for bad in bad_answers:
        assert semantic.embedding_of(bad, 4) is None


def test_the_fake_embedding_is_deterministic_and_normalised() -> None:
    a = embed_text("Where is my order?", 64)
    assert a == embed_text("Where is my order?", 64) and len(a) == 64
    assert sum(x * x for x in a) == pytest.approx(1.0)
    assert embed_text("", 8) == [0.0] * 8


def scored_pairs() -> list[tuple[dict[str, Any], Scored]]:
    out = []
    for line in PAIRS.read_text(encoding="utf-8").splitlines():
        pair = orjson.loads(line)
        a, b = (np.asarray(embed_text(pair[k], DIMENSIONS), dtype=np.float32) for k in ("a", "b"))
        out.append((pair, Scored(float(a @ b), semantic.marks(pair["a"]) == semantic.marks(pair["b"]),
                                 bool(pair["same"]))))
    return out


def test_the_evaluation_set_has_no_false_hit_at_the_default_threshold(capsys: pytest.CaptureFixture[str]) -> None:
    pairs = scored_pairs()
    scores = [s for _, s in pairs]
    paraphrases = sum(s.paraphrase for s in scores)
    assert len(scores) >= 60 and 25 <= paraphrases <= len(scores) - 25, "the set has both kinds, in numbers"
    # what a tenant gets (threshold and marks), and the threshold on its own: no false hit either way
    assert semantic.false_hits(scores, THRESHOLD) == []
    assert semantic.false_hits(scores, THRESHOLD, guard=False) == []
    # ... and the marks guard alone would stop most of them at a low threshold: the two protect each other
    assert len(semantic.false_hits(scores, 0.5)) < len(semantic.false_hits(scores, 0.5, guard=False)) / 2
    guarded, bare = semantic.recall(scores, THRESHOLD), semantic.recall(scores, THRESHOLD, guard=False)
    with capsys.disabled():
        print(f"\nsemantic evaluation set: {len(scores)} pairs ({paraphrases} paraphrases), threshold {THRESHOLD}: "
              f"0 false hits, recall {guarded:.0%} (threshold alone {bare:.0%}); lowest safe threshold "
              f"{semantic.safe_threshold(scores)}")
    assert guarded >= 0.6, f"recall fell to {guarded:.0%}"
    assert semantic.safe_threshold(scores) <= THRESHOLD
