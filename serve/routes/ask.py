"""POST /v1/ask: a cited RAG answer, as Server-Sent Events or one JSON body.

Stream: `event: sources` (the numbered chunks in prompt order), `event: token` per text delta,
then `event: done` with the answer, citations and usage; `event: error` if it fails midway.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Controller, Request, Response, post
from litestar.openapi import ResponseSpec
from litestar.params import JSONBody
from litestar.response import ServerSentEvent

from ragcache.answer import PreparedQuestion
from ragcache.engine import Completion, TextDelta
from ragcache.errors import RagcacheError
from ragcache.runtime import Ticket
from serve.answers import answer_out, prepare, source_ends, source_out
from serve.conversations import Conversations
from serve.generation import (
    SamplingRequest,
    collect,
    refuse_if_busy,
    sampling_params,
    stream,
    submit,
)
from serve.schemas import AskAnswer, AskRequest
from serve.services import AppStateDep, ServicesDep


async def _releasing(
    events: AsyncIterator[dict[str, str]], conversations: Conversations, conversation_id: str
) -> AsyncIterator[dict[str, str]]:
    """The stream's events, then (however it ends: done, error, client gone) the conversation
    is free for its next question; the done event carries its id."""
    try:
        async for event in events:
            if event.get("event") == "done":
                payload = msgspec.json.decode(event["data"])
                payload["conversation"] = conversation_id
                event = {"event": "done", "data": msgspec.json.encode(payload).decode()}
            yield event
    finally:
        conversations.release(conversation_id)


def _sse(event: str, payload: Any) -> dict[str, str]:
    return {"event": event, "data": msgspec.json.encode(payload).decode()}


class AskController(Controller):
    path = "/v1/ask"
    tags = ["ask"]

    @post(
        summary="Answer a question from the store with cited sources",
        description="`stream` (default true) sends Server-Sent Events: sources, token..., done.",
        status_code=200,
        responses={
            200: ResponseSpec(
                AskAnswer,
                description="The answer as JSON when `stream` is false; text/event-stream events otherwise.",
            )
        },
    )
    async def ask(
        self,
        data: JSONBody[AskRequest],
        app_state: AppStateDep,
        services: ServicesDep,
        request: Request,
    ) -> Response[AskAnswer] | ServerSentEvent:
        arrived = time.perf_counter()
        params = sampling_params(app_state, services, SamplingRequest.of(data))
        refuse_if_busy(services)
        conversations = app_state.conversations
        conversation_id, conversation = conversations.open(data.conversation)
        streaming = False
        try:
            prepared = await prepare(
                app_state,
                services,
                data.question,
                data.k,
                data.order,
                data.where,
                conversation=conversation,
                mode=data.mode,
            )
            if not prepared.generate:  # a quote or a decline: the model need not run
                done = services.stack.answerer.complete(prepared, None, arrived)
                ttft = time.perf_counter() - arrived
                answer = answer_out(
                    done, prepared.order, ttft, conversation_id, source_ends(prepared)
                )
                if data.stream:
                    return ServerSentEvent(self._unrun_events(prepared, answer))
                return Response(answer)
            ticket = submit(services, prepared.prompt, params, conversation_id)
            if data.stream:
                # Released when the request ends, even if the client left before the stream
                # started (then nobody iterates the events), and when the stream ends.
                streaming = True
                ticket.add_done_callback(lambda: conversations.release(conversation_id))
                events = self._events(app_state, services, prepared, ticket, arrived)
                return ServerSentEvent(_releasing(events, conversations, conversation_id))
            finished = await collect(ticket, request, arrived)
            done = services.stack.answerer.complete(prepared, finished.completion, arrived)
            app_state.metrics.observe_generation("ask", finished.completion.stats, finished.ttft_s)
            return Response(
                answer_out(
                    done, prepared.order, finished.ttft_s, conversation_id, source_ends(prepared)
                )
            )
        finally:
            if not streaming:
                conversations.release(conversation_id)

    @staticmethod
    async def _unrun_events(
        prepared: PreparedQuestion, answer: AskAnswer
    ) -> AsyncIterator[dict[str, str]]:
        yield _sse(
            "sources",
            {"order": prepared.order, "sources": [source_out(s) for s in prepared.sources]},
        )
        yield _sse("token", {"text": answer.answer})
        yield _sse("done", answer)

    @staticmethod
    async def _events(
        app_state: AppStateDep,
        services: ServicesDep,
        prepared: PreparedQuestion,
        ticket: Ticket,
        arrived: float,
    ) -> AsyncIterator[dict[str, str]]:
        yield _sse(
            "sources",
            {"order": prepared.order, "sources": [source_out(s) for s in prepared.sources]},
        )
        first: float | None = None
        completion: Completion | None = None
        try:
            async for event in stream(ticket):
                if isinstance(event, TextDelta):
                    first = first or time.perf_counter()
                    yield _sse("token", {"text": event.text})
                else:
                    completion = event
        except RagcacheError as exc:
            yield _sse("error", {"message": exc.message, "code": type(exc).__name__})
            return
        assert completion is not None
        ttft = (first or time.perf_counter()) - arrived
        app_state.metrics.observe_generation("ask", completion.stats, ttft)
        done = services.stack.answerer.complete(prepared, completion, arrived)
        yield _sse("done", answer_out(done, prepared.order, ttft, "", source_ends(prepared)))
