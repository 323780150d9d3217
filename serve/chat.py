"""OpenAI chat messages -> segmented prompts, plain or answered from the store."""

from __future__ import annotations

from collections.abc import Sequence

from ragcache.answer import Conversation, PreparedQuestion
from ragcache.errors import InvalidRequestError
from ragcache.rag_prompt import Turn
from ragcache.segments import Message, SegmentedPrompt, encode_chat, encode_segments
from serve.answers import prepare
from serve.schemas import ChatMessage, RetrievalOptions
from serve.services import AppState, Services


def _parts(message: ChatMessage) -> tuple[str, ...]:
    if message.content is None:
        return ()
    if isinstance(message.content, str):
        return (message.content,)
    return tuple(p.text for p in message.content)


def _text(message: ChatMessage) -> str:
    return "".join(_parts(message))


async def chat_prompt(
    state: AppState, services: Services, messages: Sequence[ChatMessage]
) -> SegmentedPrompt:
    """The chat template applied with each content part its own segment (so shared leading
    messages and parts share cached KV). Raises InvalidRequestError (no chat template, a template
    that refuses the messages, nothing to say)."""
    loaded = services.stack.loaded
    if not loaded.chat:
        raise InvalidRequestError(
            f"{services.model_id} has no chat template", hint="use /v1/completions"
        )
    converted = [
        Message("system" if m.role == "developer" else m.role, _parts(m)) for m in messages
    ]

    def encode() -> SegmentedPrompt:
        try:
            return encode_chat(loaded.tokenizer, converted)
        except Exception as exc:  # jinja raises its own errors for message orders it refuses
            raise InvalidRequestError(
                f"the chat template cannot render these messages: {exc}"
            ) from exc

    return await state.off_loop(encode)


async def completion_prompt(state: AppState, services: Services, text: str) -> SegmentedPrompt:
    tokenizer = services.stack.loaded.tokenizer

    def encode() -> SegmentedPrompt:
        try:
            return encode_segments(tokenizer, [text])
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from exc

    return await state.off_loop(encode)


async def retrieval_prompt(
    state: AppState,
    services: Services,
    messages: Sequence[ChatMessage],
    options: RetrievalOptions,
) -> PreparedQuestion:
    """Answer the last user message from the store. Earlier user/assistant pairs become the
    conversation (so a follow-up extends its cached path); client system messages give way to the
    RAG instructions."""
    if messages[-1].role != "user":
        raise InvalidRequestError("with retrieval, the last message must be the user's question")
    tokenizer = services.stack.loaded.tokenizer
    conversation = Conversation()
    question: str | None = None
    for m in messages[:-1]:
        if m.role == "user":
            question = _text(m)
        elif m.role == "assistant" and question is not None:
            answer = tokenizer.encode(_text(m), add_special_tokens=False)
            conversation.turns.append(Turn(question, answer))
            conversation.turn_chunks.append([])
            question = None
    return await prepare(
        state,
        services,
        _text(messages[-1]),
        options.k,
        options.order,
        options.where,
        conversation,
        mode="generate",  # an OpenAI client reads the model's own text; citations are checked
    )
