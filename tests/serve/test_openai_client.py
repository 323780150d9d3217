"""The official `openai` client against a real server: chat, completions, streaming, cached tokens."""

from __future__ import annotations

import openai
import pytest

from tests.serve.conftest import API_KEY
from tests.serve.server import ServerThread


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)


def served(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert len(models) == 1 and models[0].id


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_an_unknown_model_is_404_model_not_found(client: openai.OpenAI, endpoint: str) -> None:
    # OpenAI answers a typo in `model` with 404 model_not_found; answering with the default
    # model instead would leave the client no signal.
    with pytest.raises(openai.NotFoundError) as caught:
        if endpoint == "chat":
            client.chat.completions.create(
                model="gpt-4-nope", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
        else:
            client.completions.create(model="gpt-4-nope", prompt="hi", max_tokens=4)
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "model_not_found"
    assert "gpt-4-nope" in error["message"] and served(client) in error["hint"]


def test_chat_completion_reports_cached_tokens_on_a_repeated_prompt(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "You answer briefly about caches and prefixes."},
        {"role": "user", "content": "What does the cache keep for a prompt it has seen before?"},
    ]
    first = client.chat.completions.create(model=served(client), messages=messages, max_tokens=8)
    again = client.chat.completions.create(model=served(client), messages=messages, max_tokens=8)
    assert first.object == "chat.completion" and first.choices[0].finish_reason in {
        "stop",
        "length",
    }
    assert first.usage.prompt_tokens == again.usage.prompt_tokens > 0
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    # Greedy decoding from a restored prefix gives the same text as the cold run.
    assert again.choices[0].message.content == first.choices[0].message.content


def test_chat_streaming_matches_the_non_streamed_text(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Tell me about sliding window attention."}]
    whole = client.chat.completions.create(model=served(client), messages=messages, max_tokens=12)
    stream = client.chat.completions.create(
        model=served(client),
        messages=messages,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    usage = [c.usage for c in chunks if c.usage is not None]
    assert text == whole.choices[0].message.content
    assert finish == [whole.choices[0].finish_reason]
    assert len(usage) == 1 and usage[0].completion_tokens == whole.usage.completion_tokens
    assert usage[0].prompt_tokens_details.cached_tokens > 0  # the same prompt ran just before


def test_completions_streaming_and_not(client: openai.OpenAI) -> None:
    prompt = "The radix tree stores token sequences"
    whole = client.completions.create(model=served(client), prompt=prompt, max_tokens=10)
    assert whole.object == "text_completion" and whole.usage.completion_tokens >= 1
    parts = list(
        client.completions.create(model=served(client), prompt=prompt, max_tokens=10, stream=True)
    )
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_string_ends_the_text(client: openai.OpenAI) -> None:
    prompt = "Retrieval finds the chunks"
    whole = (
        client.completions.create(model=served(client), prompt=prompt, max_tokens=20)
        .choices[0]
        .text
    )
    if len(whole) < 4:
        pytest.skip("the random model ended at once")
    stop = whole[2:4]
    cut = client.completions.create(model=served(client), prompt=prompt, max_tokens=20, stop=[stop])
    assert cut.choices[0].text == whole[: whole.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_retrieval_extension_answers_from_the_store(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=served(client),
        messages=[{"role": "user", "content": "How does full-text search rank documents?"}],
        max_tokens=8,
        extra_body={"retrieval": {"k": 3}},
    )
    extra = out.model_extra or {}
    sources = extra["sources"]
    assert [s["number"] for s in sources] == [1, 2, 3]
    assert all(s["doc_id"].endswith(".md") for s in sources)
    assert isinstance(extra["citations"], list)
    assert out.usage.prompt_tokens > 100  # the chunks are in the prompt


def test_errors_reach_the_client_as_typed_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        client.completions.create(model=served(client), prompt="hi", max_tokens=100_000)
    assert "max_tokens" in exc.value.message
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=served(client), messages=[], max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=client.base_url, api_key="wrong-key-123", max_retries=0
        ).models.list()
