"""RAG over HTTP: prepare a question off the event loop, and shape answers for the wire."""

from __future__ import annotations

from ragcache.answer import AnswerDone, Conversation, PreparedQuestion, Source
from ragcache.errors import InvalidRequestError, RagcacheError
from serve.errors import LimitExceededError
from serve.schemas import AskAnswer, AskUsage, QuoteOut, SourceOut
from serve.services import AppState, Services


async def prepare(
    state: AppState,
    services: Services,
    question: str,
    k: int | None,
    order: str | None,
    where: str | None,
    conversation: Conversation | None = None,
    mode: str | None = None,
) -> PreparedQuestion:
    """Retrieve, order and assemble the prompt on a thread. Raises LimitExceededError (422),
    InvalidRequestError (400: empty question or store, bad `where`), PromptTooLongError (413)."""
    settings = state.settings
    if len(question) > settings.max_question_chars:
        raise LimitExceededError(
            f"the question has {len(question)} characters; this server takes at most "
            f"{settings.max_question_chars}"
        )
    if k is not None and k > settings.max_k:
        raise LimitExceededError(f"k is {k} but this server retrieves at most {settings.max_k}")
    answerer = services.stack.answerer

    def run() -> PreparedQuestion:
        try:
            return answerer.prepare(question, k, order, where, conversation, mode)
        except RagcacheError:
            raise
        except Exception as exc:  # LanceDB rejects a bad filter with assorted exception types
            if where is None:
                raise
            raise InvalidRequestError(
                f"the where filter cannot be applied: {exc}",
                hint="an SQL condition on chunk columns, e.g. \"source LIKE '%faq%'\"",
            ) from exc

    return await state.off_loop(run)


def source_ends(prepared: PreparedQuestion) -> dict[str, int]:
    """chunk id -> the prompt position where the chunk's tokens end: a source is served from the
    KV cache when that end lies within the restored prefix."""
    tokens = list(prepared.prompt.tokens)
    out: dict[str, int] = {}
    for chunk in prepared.chunks:
        ids = list(chunk.token_ids)
        if not ids:
            continue
        first = ids[0]
        for i in range(len(tokens) - len(ids) + 1):
            if tokens[i] == first and tokens[i : i + len(ids)] == ids:
                out[chunk.chunk_id] = i + len(ids)
                break
    return out


def source_out(s: Source, cached_through: int = 0, ends: dict[str, int] | None = None) -> SourceOut:
    end = (ends or {}).get(s.chunk_id)
    return SourceOut(
        number=s.number,
        chunk_id=s.chunk_id,
        doc_id=s.doc_id,
        source=s.source,
        title=s.title,
        heading_path=list(s.heading_path),
        position=s.position,
        score=float(s.score),
        text=s.text,
        cached=end is not None and end <= cached_through,
    )


def answer_out(
    done: AnswerDone,
    order: str,
    ttft_s: float,
    conversation_id: str = "",
    ends: dict[str, int] | None = None,
) -> AskAnswer:
    stats = done.completion.stats
    return AskAnswer(
        answer=done.text,
        citations=[s.number for s in done.citations],
        quotes=[QuoteOut(**c.as_dict()) for c in done.quotes],
        method=done.method,
        declined=done.declined,
        confidence=done.confidence,
        model_text=done.completion.text,
        sources=[source_out(s, stats.cached_tokens, ends) for s in done.sources],
        order=order,
        finish_reason=stats.finish_reason,
        usage=AskUsage(
            prompt_tokens=stats.prompt_tokens,
            cached_tokens=stats.cached_tokens,
            recomputed_tokens=stats.recomputed_tokens,
            chunk_reused_tokens=stats.chunk_reused_tokens,
            completion_tokens=stats.generated_tokens,
            ttft_s=round(ttft_s, 4),
        ),
        figures=dict(done.figures.__dict__),
        conversation=conversation_id,
    )
