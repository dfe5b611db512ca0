"""Objects scoped to their tenant, through the real openai SDK over sockets against the fake
upstream (one provider account for everyone, as a real one is): stored responses and chat
completions on the budgeted endpoints, files, uploads, vector stores, batches and fine-tuning jobs
through passthrough. Another tenant's object is 404 before anything reaches the upstream; lists
hold only the caller's objects; money-bearing objects are refused on passthrough unless allowed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import redis

from guardproxy.testing.fake_upstream import FakeUpstreamState
from tests.helpers import HI, OTHER_TENANT_KEY, TENANT_KEY, all_settled, make_config, wait_for

Clients = tuple[openai.OpenAI, openai.OpenAI]


@pytest.fixture
def tenants() -> Iterator[Callable[[str], Clients]]:
    """acme's and globex's clients for a proxy URL, closed after the test."""
    opened: list[openai.OpenAI] = []

    def make(url: str) -> Clients:
        opened.extend([openai.OpenAI(base_url=url + "/v1", api_key=TENANT_KEY, max_retries=0),
                       openai.OpenAI(base_url=url + "/v1", api_key=OTHER_TENANT_KEY, max_retries=0)])
        return opened[-2], opened[-1]

    yield make
    for client in opened:
        client.close()


@pytest.fixture
def clients(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], tenants: Callable[[str], Clients]
) -> Clients:
    """acme's and globex's clients on a proxy that passes other paths through."""
    return tenants(serve_proxy(make_config(upstream_url, store={"redis_url": redis_url},
                                           unbudgeted_paths="passthrough")))


@pytest.fixture
def rejecting(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], tenants: Callable[[str], Clients]
) -> Clients:
    """The same on a proxy with the default ``unbudgeted_paths: reject``."""
    return tenants(serve_proxy(make_config(upstream_url, store={"redis_url": redis_url})))


def refused(call: Callable[[], Any], fake_state: FakeUpstreamState) -> openai.NotFoundError:
    """``call`` is 404 ``object_not_found`` and reaches no upstream."""
    before = len(fake_state.paths)
    with pytest.raises(openai.NotFoundError) as caught:
        call()
    assert caught.value.code == "object_not_found"
    assert len(fake_state.paths) == before, "another tenant's object reached the upstream"
    return caught.value


# -- stored responses and chat completions (budgeted endpoints, no passthrough needed) -----------


def test_a_stored_response_is_its_tenants_alone(rejecting: Clients, fake_state: FakeUpstreamState) -> None:
    acme, globex = rejecting
    made = acme.responses.create(model="gpt-4o", input="Remember the dispatcher.")
    assert acme.responses.retrieve(made.id).id == made.id
    items = acme.responses.input_items.list(made.id)
    assert [item.model_dump()["content"][0]["text"] for item in items.data] == ["Remember the dispatcher."]
    refused(lambda: globex.responses.retrieve(made.id), fake_state)
    refused(lambda: globex.responses.input_items.list(made.id), fake_state)
    refused(lambda: globex.responses.cancel(made.id), fake_state)
    refused(lambda: globex.responses.delete(made.id), fake_state)
    # continuing another tenant's conversation would read it
    refused(lambda: globex.responses.create(model="gpt-4o", input="And?", previous_response_id=made.id), fake_state)
    follow = acme.responses.create(model="gpt-4o", input="And?", previous_response_id=made.id)
    assert fake_state.requests[-1]["previous_response_id"] == made.id and follow.id != made.id
    assert acme.responses.cancel(made.id).status == "cancelled"
    acme.responses.delete(made.id)
    refused(lambda: acme.responses.retrieve(made.id), fake_state)  # deleted: no longer anyone's


def test_a_streamed_response_can_be_retrieved_as_soon_as_its_stream_ends(
    rejecting: Clients, fake_state: FakeUpstreamState
) -> None:
    acme, globex = rejecting
    for turn in range(5):
        events = list(acme.responses.create(model="gpt-4o", input=f"turn {turn}", stream=True))
        ident = events[-1].response.id  # type: ignore[union-attr]
        assert acme.responses.retrieve(ident).id == ident
        refused(lambda: globex.responses.retrieve(ident), fake_state)  # noqa: B023


def test_a_response_sent_with_store_false_is_nobodys(rejecting: Clients, fake_state: FakeUpstreamState) -> None:
    acme, _ = rejecting
    made = acme.responses.create(model="gpt-4o", input="forget me", store=False)
    refused(lambda: acme.responses.retrieve(made.id), fake_state)


def test_stored_chat_completions_are_listed_and_read_by_their_tenant_only(
    rejecting: Clients, fake_state: FakeUpstreamState, redis_url: str
) -> None:
    acme, globex = rejecting
    mine = [acme.chat.completions.create(model="gpt-4o", messages=HI, store=True).id for _ in range(3)]
    theirs = globex.chat.completions.create(model="gpt-4o-mini", messages=HI, store=True).id
    acme.chat.completions.create(model="gpt-4o", messages=HI)  # not stored
    chunks = list(acme.chat.completions.create(model="gpt-4o", messages=HI, store=True, stream=True))
    streamed = chunks[0].id
    all_settled(redis_url)
    assert len(fake_state.objects.objects) == 5
    assert [c.id for c in acme.chat.completions.list()] == [*mine, streamed]
    assert [c.id for c in acme.chat.completions.list(limit=2)] == [*mine, streamed]  # every page, in order
    assert [c.id for c in globex.chat.completions.list()] == [theirs]
    assert acme.chat.completions.retrieve(mine[0]).id == mine[0]
    assert acme.chat.completions.messages.list(mine[0]).data[0].content == " hello" * 12
    refused(lambda: globex.chat.completions.retrieve(mine[0]), fake_state)
    refused(lambda: globex.chat.completions.delete(mine[0]), fake_state)
    refused(lambda: globex.chat.completions.update(mine[0], metadata={"x": "y"}), fake_state)
    assert acme.chat.completions.delete(mine[0]).deleted


def test_other_paths_stay_refused_without_passthrough(rejecting: Clients, fake_state: FakeUpstreamState) -> None:
    acme, _ = rejecting
    with pytest.raises(openai.NotFoundError) as caught:
        acme.vector_stores.list()
    assert caught.value.code == "unknown_url" and fake_state.paths == []
    # files and batches are the budgeted Batch API's (test_batches.py): served, scoped
    assert acme.files.list().data == [] and acme.batches.list().data == []


# -- passthrough: files, uploads, vector stores -----------------------------------------------------


def test_a_file_is_read_listed_and_deleted_by_its_tenant_only(
    clients: Clients, fake_state: FakeUpstreamState
) -> None:
    acme, globex = clients
    uploaded = acme.files.create(file=("jobs.jsonl", b'{"a": 1}\n'), purpose="batch")
    other = globex.files.create(file=("other.jsonl", b'{"b": 2}\n'), purpose="batch")
    assert acme.files.retrieve(uploaded.id).filename == "jobs.jsonl"
    assert acme.files.content(uploaded.id).read() == b'{"a": 1}\n'
    assert [f.id for f in acme.files.list()] == [uploaded.id]
    assert [f.id for f in globex.files.list()] == [other.id]
    for call in (lambda: globex.files.retrieve(uploaded.id), lambda: globex.files.content(uploaded.id),
                 lambda: globex.files.delete(uploaded.id)):
        refused(call, fake_state)
    assert acme.files.delete(uploaded.id).deleted
    refused(lambda: acme.files.retrieve(uploaded.id), fake_state)


def test_a_list_reads_past_pages_full_of_other_tenants_objects(
    clients: Clients, fake_state: FakeUpstreamState
) -> None:
    acme, globex = clients
    mine = []
    for i in range(30):
        client = acme if i % 10 == 9 else globex
        made = client.files.create(file=(f"f{i}.txt", b"x"), purpose="assistants")
        if client is acme:
            mine.append(made.id)
    first = acme.files.list(limit=2)
    assert [f.id for f in first.data] == mine[:2] and first.has_more
    assert [f.id for f in acme.files.list(limit=2)] == mine  # the SDK pages on with the last id
    assert len([f for f in globex.files.list(limit=100)]) == 27


def test_objects_named_in_a_body_must_be_the_callers(clients: Clients, fake_state: FakeUpstreamState) -> None:
    acme, globex = clients
    secret = acme.files.create(file=("secret.txt", b"acme's prices"), purpose="assistants")
    refused(lambda: globex.vector_stores.create(name="mine", file_ids=[secret.id]), fake_state)
    store = globex.vector_stores.create(name="mine")
    refused(lambda: globex.vector_stores.files.create(store.id, file_id=secret.id), fake_state)
    refused(lambda: globex.responses.create(
        model="gpt-4o", input=[{"role": "user", "content": [{"type": "input_file", "file_id": secret.id}]}]),
        fake_state)
    refused(lambda: globex.responses.create(
        model="gpt-4o", input="x", tools=[{"type": "file_search", "vector_store_ids": [store.id, "vs_acme"]}]),
        fake_state)
    acme_store = acme.vector_stores.create(name="acme")
    assert acme.vector_stores.files.create(acme_store.id, file_id=secret.id).id == secret.id
    assert [s.id for s in globex.vector_stores.list()] == [store.id]
    refused(lambda: globex.vector_stores.files.list(acme_store.id), fake_state)


def test_a_completed_uploads_file_is_the_uploaders(clients: Clients, fake_state: FakeUpstreamState) -> None:
    acme, globex = clients
    upload = acme.uploads.create(bytes=5, filename="big.txt", mime_type="text/plain", purpose="assistants")
    part = acme.uploads.parts.create(upload.id, data=b"hello")
    refused(lambda: globex.uploads.complete(upload.id, part_ids=[part.id]), fake_state)
    done = acme.uploads.complete(upload.id, part_ids=[part.id])
    assert done.file is not None
    assert acme.files.content(done.file.id).read() == b"hello"
    refused(lambda: globex.files.content(done.file.id), fake_state)  # type: ignore[union-attr]


def test_another_spelling_of_a_collection_is_refused(clients: Clients, fake_state: FakeUpstreamState) -> None:
    acme, _ = clients
    made = acme.files.create(file=("a.txt", b"a"), purpose="assistants")
    url = str(acme.base_url).rstrip("/")
    for path in (f"/Files/{made.id}", f"/files./{made.id}", "/FILES"):
        answer = httpx.get(url + path, headers={"authorization": f"Bearer {OTHER_TENANT_KEY}"})
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_path", path


# -- money-bearing objects on passthrough ------------------------------------------------------------


def test_fine_tunes_are_refused_on_passthrough_unless_allowed(
    clients: Clients, fake_state: FakeUpstreamState, upstream_url: str, redis_url: str,
    serve_proxy: Callable[..., str], tenants: Callable[[str], Clients],
) -> None:
    acme, _ = clients
    data = acme.files.create(file=("train.jsonl", b"{}\n"), purpose="fine-tune")
    before = len(fake_state.paths)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        acme.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=data.id)
    assert caught.value.code == "unbudgeted_spend_refused"
    assert "unbudgeted_allow_paid" in caught.value.message
    assert len(fake_state.paths) == before
    assert acme.fine_tuning.jobs.list().data == []  # reading is not spending
    allowed = make_config(upstream_url, store={"redis_url": redis_url}, unbudgeted_paths="passthrough",
                          unbudgeted_allow_paid=["fine_tuning/jobs"])
    acme2, globex2 = tenants(serve_proxy(allowed))
    job = acme2.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=data.id)
    assert acme2.fine_tuning.jobs.retrieve(job.id).id == job.id
    assert [j.id for j in acme2.fine_tuning.jobs.list()] == [job.id]
    refused(lambda: globex2.fine_tuning.jobs.retrieve(job.id), fake_state)
    refused(lambda: globex2.fine_tuning.jobs.cancel(job.id), fake_state)
    refused(lambda: globex2.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=data.id), fake_state)
    assert globex2.fine_tuning.jobs.list().data == []


def test_the_record_of_objects_lives_in_the_store_under_the_tenant(
    clients: Clients, redis_url: str
) -> None:
    acme, _ = clients
    made = acme.files.create(file=("a.txt", b"a"), purpose="assistants")
    response = acme.responses.create(model="gpt-4o", input="hi")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        wait_for(lambda: client.get(f"gp:{{acme}}:obj:{response.id}") == "openai")
        assert client.get(f"gp:{{acme}}:obj:{made.id}") == "openai" and client.ttl(f"gp:{{acme}}:obj:{made.id}") == -1
        assert 29 * 86400 < client.ttl(f"gp:{{acme}}:obj:{response.id}") <= 30 * 86400
        assert client.keys("gp:{globex}:obj:*") == []
    finally:
        client.close()
