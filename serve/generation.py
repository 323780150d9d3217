"""From HTTP to the model worker and back: limits, submission, and the event streams handlers use.

A request's generation ends in one of three ways: it completes, the client goes away (its ticket is
cancelled, so the worker frees the slot and keeps what it computed in the cache), or it fails with a
RagcacheError that the exception handlers map to a status.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from litestar import Request

from ragcache.engine import Completion, TextDelta
from ragcache.errors import PromptTooLongError
from ragcache.runtime import QueueFullError, Ticket
from ragcache.sampling import SamplingParams
from ragcache.segments import SegmentedPrompt
from serve.errors import LimitExceededError, UnknownModelError
from serve.services import AppState, Services

MAX_STOP_STRINGS = 4


@dataclass(frozen=True)
class SamplingRequest:
    """The sampling fields every generation endpoint takes, as sent (None: server default)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    # Answers end when they start repeating; raw OpenAI-style generation gives what was asked.
    stop_loops: bool = True
    speculation: str | None = None  # "lookup" or "off"; None: the server's setting
    chunk_reuse: str | None = None  # "off" or "epic"; None: the server's setting

    @classmethod
    def of(
        cls, body: Any, max_tokens: int | None = None, stop_loops: bool = True
    ) -> SamplingRequest:
        """The sampling fields of a request body (/v1/ask, /v1/completions, chat), which all
        name them alike; `max_tokens` overrides the body's (chat has two spellings of it)."""
        return cls(
            body.max_tokens if max_tokens is None else max_tokens,
            body.temperature,
            body.top_p,
            body.seed,
            body.stop,
            stop_loops=stop_loops,
            speculation=body.speculation,
            chunk_reuse=body.chunk_reuse,
        )


def sampling_params(state: AppState, services: Services, req: SamplingRequest) -> SamplingParams:
    """SamplingParams within this server's limits. Raises LimitExceededError (422)."""
    limit = state.settings.max_tokens
    max_tokens = services.default_max_tokens if req.max_tokens is None else req.max_tokens
    if max_tokens > limit:
        raise LimitExceededError(
            f"max_tokens is {max_tokens} but this server allows at most {limit}"
        )
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > MAX_STOP_STRINGS:
        raise LimitExceededError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    gen = state.core.generation
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=gen.temperature if req.temperature is None else req.temperature,
        top_p=gen.top_p if req.top_p is None else req.top_p,
        seed=req.seed,
        stop=stop,
        stop_loops=req.stop_loops,
        speculation=req.speculation or state.settings.speculation,
        chunk_reuse=req.chunk_reuse or state.settings.chunk_reuse,
    ).validate()


def check_model(services: Services, requested: str | None) -> None:
    """Refuse a request for a model this server does not run, as OpenAI does (404), instead of
    answering it with another model: a client with a typo must hear about it. An empty name
    means the served model. `/v1/models` lists the names accepted."""
    if requested and requested not in services.model_names:
        served = ", ".join(services.model_names)
        raise UnknownModelError(
            f"the model {requested!r} does not exist on this server",
            hint=f"this server runs {served} (GET /v1/models)",
        )


def refuse_if_busy(services: Services) -> None:
    """Refuse before doing any work (retrieval) when the worker's queue is already full."""
    worker = services.worker
    if worker.in_flight >= worker.settings.max_queue:
        per_slot = worker.mean_request_s / max(1, worker.settings.max_batch)
        raise QueueFullError(worker.in_flight, max(1.0, per_slot * worker.in_flight))


def submit(
    services: Services,
    prompt: SegmentedPrompt,
    params: SamplingParams,
    conversation: str | None = None,
) -> Ticket:
    """Queue a generation. Raises PromptTooLongError (413), QueueFullError (429).

    `conversation`: the conversation this turn belongs to, so replicas keep it on one."""
    n = len(prompt.tokens)
    if n > services.max_prompt_tokens:
        raise PromptTooLongError(
            f"the prompt has {n} tokens but this server accepts at most {services.max_prompt_tokens}",
            hint="shorten the prompt or retrieve fewer chunks",
        )
    return services.worker.submit(prompt, params, conversation)


@dataclass
class Finished:
    text: str
    completion: Completion
    ttft_s: float  # request arrival to first token (or to the end, when nothing was generated)


async def stream(ticket: Ticket) -> AsyncIterator[TextDelta | Completion]:
    """The ticket's events; leaving early (the client disconnected) cancels the generation."""
    try:
        async for event in ticket.aevents():
            yield event
    finally:
        ticket.cancel()  # a no-op once the request completed


async def collect(ticket: Ticket, request: Request, arrived: float) -> Finished:
    """Run the generation to its end; a client that disconnects meanwhile cancels it.

    Re-raises the RagcacheError the request hit (outside the task group, so handlers see it bare).
    """
    result: list[Finished] = []
    errors: list[Exception] = []

    async def consume(scope: anyio.CancelScope) -> None:
        first: float | None = None
        parts: list[str] = []
        try:
            async for event in stream(ticket):
                if isinstance(event, TextDelta):
                    first = first or time.perf_counter()
                    parts.append(event.text)
                else:
                    ttft = (first or time.perf_counter()) - arrived
                    result.append(Finished(event.text or "".join(parts), event, ttft))
        except Exception as exc:
            errors.append(exc)
        scope.cancel()

    async def watch_disconnect() -> None:
        # The body is read by now, so the next message is the disconnect (or never comes).
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                ticket.cancel()  # the worker then ends the request at its next step
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume, tg.cancel_scope)
        tg.start_soon(watch_disconnect)
    if errors:
        raise errors[0]
    return result[0]
