"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/models.

The official `openai` client works unchanged; `usage.prompt_tokens_details.cached_tokens` says how
much of the prompt the KV cache supplied. Extension: `"retrieval": {"k": 5}` on a chat request
answers the last user message from the store and adds `sources` and `citations` to the response.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.openapi import ResponseSpec
from litestar.params import JSONBody
from litestar.response import ServerSentEvent

from ragcache.answer import PreparedQuestion
from ragcache.engine import Completion, GenerationStats, TextDelta
from ragcache.errors import RagcacheError
from ragcache.runtime import Ticket
from serve.answers import source_out
from serve.chat import chat_prompt, completion_prompt, retrieval_prompt
from serve.errors import LimitExceededError
from serve.generation import (
    SamplingRequest,
    check_model,
    collect,
    refuse_if_busy,
    sampling_params,
    stream,
    submit,
)
from serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    StreamOptions,
    TextCompletion,
    Usage,
)
from serve.services import AppStateDep, ServicesDep

_STREAM_NOTE = "JSON when `stream` is false; text/event-stream chunks ending in [DONE] otherwise."


def usage(stats: GenerationStats) -> Usage:
    return Usage(
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.generated_tokens,
        total_tokens=stats.prompt_tokens + stats.generated_tokens,
        prompt_tokens_details=PromptTokensDetails(
            cached_tokens=stats.cached_tokens, chunk_reused_tokens=stats.chunk_reused_tokens
        ),
    )


def finish_reason(stats: GenerationStats) -> str:
    # OpenAI knows "stop" and "length"; a cancelled request (server shutting down) ended early.
    return "length" if stats.finish_reason == "length" else "stop"


def _json(payload: Any) -> str:
    return msgspec.json.encode(payload).decode()


def _max_tokens(data: ChatCompletionRequest) -> int | None:
    both = data.max_tokens is not None and data.max_completion_tokens is not None
    if both and data.max_tokens != data.max_completion_tokens:
        raise LimitExceededError("max_tokens and max_completion_tokens disagree")
    return data.max_completion_tokens or data.max_tokens


async def _openai_stream(
    app_state: AppStateDep,
    endpoint: str,
    ticket: Ticket,
    arrived: float,
    chunk: Callable[[str | None, str | None], dict[str, Any]],
    options: StreamOptions | None,
    on_done: Callable[[Completion], dict[str, Any]] | None = None,
) -> AsyncIterator[str]:
    """`chunk(text, finish_reason)` shapes one event; usage follows when the client asked."""
    yield _json(chunk("", None))
    first: float | None = None
    try:
        async for event in stream(ticket):
            if isinstance(event, TextDelta):
                first = first or time.perf_counter()
                yield _json(chunk(event.text, None))
                continue
            stats = event.stats
            app_state.metrics.observe_generation(
                endpoint, stats, (first or time.perf_counter()) - arrived
            )
            final = chunk(None, finish_reason(stats))
            if on_done is not None:
                final.update(on_done(event))
            yield _json(final)
            if options is not None and options.include_usage:
                yield _json({**chunk(None, None), "choices": [], "usage": usage(stats)})
    except RagcacheError as exc:
        yield _json(
            {"error": {"message": exc.message, "type": "server_error", "code": type(exc).__name__}}
        )
    yield "[DONE]"


class OpenAIController(Controller):
    path = "/v1"
    tags = ["openai"]

    @get("/models", summary="The model this server runs")
    async def models(self, services: ServicesDep) -> ModelList:
        return ModelList(data=[ModelCard(id=services.model_id, created=services.created)])

    @post(
        "/chat/completions",
        status_code=200,
        summary="Chat completion (OpenAI-compatible)",
        responses={200: ResponseSpec(ChatCompletion, description=_STREAM_NOTE)},
    )
    async def chat(
        self,
        data: JSONBody[ChatCompletionRequest],
        app_state: AppStateDep,
        services: ServicesDep,
        request: Request,
    ) -> Response[ChatCompletion] | ServerSentEvent:
        arrived = time.perf_counter()
        check_model(services, data.model)
        # A RAG answer stops when it loops; a plain chat keeps OpenAI's semantics.
        sampling = SamplingRequest.of(
            data, _max_tokens(data), stop_loops=data.retrieval is not None
        )
        params = sampling_params(app_state, services, sampling)
        refuse_if_busy(services)
        prepared: PreparedQuestion | None = None
        if data.retrieval is not None:
            prepared = await retrieval_prompt(app_state, services, data.messages, data.retrieval)
            prompt = prepared.prompt
        else:
            prompt = await chat_prompt(app_state, services, data.messages)
        ticket = submit(services, prompt, params)
        cid, created, model = (
            f"chatcmpl-{uuid.uuid4().hex[:24]}",
            int(time.time()),
            services.model_id,
        )

        def extension(completion: Completion) -> dict[str, Any]:
            if prepared is None:
                return {}
            done = services.stack.answerer.complete(prepared, completion, arrived)
            return {
                "sources": [source_out(s) for s in done.sources],
                "citations": [s.number for s in done.citations],
            }

        if data.stream:

            def chunk(text: str | None, reason: str | None) -> dict[str, Any]:
                delta = {} if text is None else {"content": text}
                if text == "":
                    delta["role"] = "assistant"
                return {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
                }

            return ServerSentEvent(
                _openai_stream(
                    app_state, "chat", ticket, arrived, chunk, data.stream_options, extension
                )
            )
        finished = await collect(ticket, request, arrived)
        stats = finished.completion.stats
        app_state.metrics.observe_generation("chat", stats, finished.ttft_s)
        ext = extension(finished.completion)
        return Response(
            ChatCompletion(
                id=cid,
                created=created,
                model=model,
                choices=[
                    ChatChoice(
                        index=0,
                        message=AssistantMessage(content=finished.text),
                        finish_reason=finish_reason(stats),
                    )
                ],
                usage=usage(stats),
                sources=ext.get("sources"),
                citations=ext.get("citations"),
            )
        )

    @post(
        "/completions",
        status_code=200,
        summary="Text completion (OpenAI-compatible)",
        responses={200: ResponseSpec(TextCompletion, description=_STREAM_NOTE)},
    )
    async def completions(
        self,
        data: JSONBody[CompletionRequest],
        app_state: AppStateDep,
        services: ServicesDep,
        request: Request,
    ) -> Response[TextCompletion] | ServerSentEvent:
        arrived = time.perf_counter()
        check_model(services, data.model)
        params = sampling_params(app_state, services, SamplingRequest.of(data, stop_loops=False))
        refuse_if_busy(services)
        prompt = await completion_prompt(app_state, services, data.prompt)
        ticket = submit(services, prompt, params)
        cid, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), services.model_id
        if data.stream:

            def chunk(text: str | None, reason: str | None) -> dict[str, Any]:
                return {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
                    ],
                }

            return ServerSentEvent(
                _openai_stream(
                    app_state, "completions", ticket, arrived, chunk, data.stream_options
                )
            )
        finished = await collect(ticket, request, arrived)
        stats = finished.completion.stats
        app_state.metrics.observe_generation("completions", stats, finished.ttft_s)
        return Response(
            TextCompletion(
                id=cid,
                created=created,
                model=model,
                choices=[
                    CompletionChoice(
                        index=0, text=finished.text, finish_reason=finish_reason(stats)
                    )
                ],
                usage=usage(stats),
            )
        )
