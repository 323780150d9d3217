"""Assemble a RAG prompt from segments: `[system][chunk 1]...[chunk k][question]`.

Chunks enter as token ids (stored at ingest time), each wrapped in a numbered source marker that is
tokenized on its own, so a chunk at a given position has the same tokens in every prompt. Two
templates: the model's chat template for instruct models, and a completion template with a worked
example for base models (Gemma 3 270M base answers in the right shape only when shown one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from ragcache.segments import SegmentedPrompt, encode_segments

SYSTEM_INSTRUCTIONS = (
    "You answer questions using only the numbered sources given. Be brief. After each fact, "
    "cite its source number in brackets, like [1]. If the sources do not answer the question, "
    "say you do not know."
)

# Repeated after the sources, right before the answer: small models follow the instruction they
# read last, and the question segment is never cached, so saying it there costs no reuse.
ANSWER_INSTRUCTIONS: dict[str, str] = {
    "default": (
        "Answer the question in one or two short sentences, using only the sources above. "
        "End each sentence with the number of its source in brackets, like [1]. If the sources "
        "do not answer the question, reply: The documents don't answer this."
    ),
}

# A worked example for base models: the answer format is learnt from it, not from instructions.
BASE_EXAMPLE = (
    f"{SYSTEM_INSTRUCTIONS}\n\n"
    "Sources:\n"
    "[1] Tea (Beverages)\nGreen tea is made from leaves that are not oxidised; black tea is "
    "fully oxidised.\n"
    "Question: How is black tea different from green tea?\n"
    "Answer: Black tea is fully oxidised, green tea is not [1].\n\n"
    "Sources:\n"
)

# A base model's answer ends where the worked example's does: at the blank line before the next
# "Sources:" block it would go on to invent.
BASE_STOPS = ("\n\n",)

_SENTINEL = "\x1fRAGCACHE{}\x1f"


@dataclass(frozen=True)
class SourceChunk:
    """A retrieved chunk as the prompt needs it."""

    chunk_id: str
    title: str
    heading: str
    token_ids: Sequence[int]


@dataclass(frozen=True)
class Turn:
    """An earlier exchange of the conversation: its question and the answer's token ids."""

    question: str
    answer_tokens: Sequence[int]


@dataclass(frozen=True)
class ChatFrame:
    """Template text around message contents, learnt once per tokenizer by rendering sentinels.

    `glue[i]` stands before message i's content; `glue[-1]` after the last one (it includes the
    generation prompt). Lets the prompt be assembled from token-id segments without re-rendering.
    """

    glue: tuple[str, ...]


def chat_frame(tokenizer: Any, roles: tuple[str, ...]) -> ChatFrame:
    """Render `roles` with sentinel contents and cut the result at the sentinels."""
    return _chat_frame(tokenizer, roles)


@lru_cache(maxsize=64)
def _chat_frame(tokenizer: Any, roles: tuple[str, ...]) -> ChatFrame:
    messages = [{"role": r, "content": _SENTINEL.format(i)} for i, r in enumerate(roles)]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    glue = []
    cursor = 0
    for i in range(len(roles)):
        at = rendered.find(_SENTINEL.format(i), cursor)
        if at < 0:
            raise ValueError("the chat template rewrites message content; cannot frame it")
        glue.append(rendered[cursor:at])
        cursor = at + len(_SENTINEL.format(i))
    glue.append(rendered[cursor:])
    return ChatFrame(tuple(glue))


def marker(position: int, chunk: SourceChunk) -> str:
    title = chunk.title + (f" > {chunk.heading}" if chunk.heading else "")
    return f"[{position + 1}] {title}\n"


def chunk_segment(tokenizer: Any, position: int, chunk: SourceChunk) -> list[int]:
    """The tokens chunk `chunk` has at `position`: its marker, its stored ids, a line break."""
    head = tokenizer.encode(marker(position, chunk), add_special_tokens=False)
    return [*head, *chunk.token_ids, *chunk_tail(tokenizer)]


def chunk_tail(tokenizer: Any) -> list[int]:
    """The line break after a chunk's ids: part of what chunk reuse may copy."""
    return list(tokenizer.encode("\n", add_special_tokens=False))


@dataclass(frozen=True)
class PromptBuilder:
    """Builds prompts for one model: chat template when it has one, completion otherwise."""

    tokenizer: Any
    chat: bool
    system: str = SYSTEM_INSTRUCTIONS
    family: str = ""  # the model's architecture: picks its answer instructions

    @property
    def answer_instructions(self) -> str:
        return ANSWER_INSTRUCTIONS.get(self.family, ANSWER_INSTRUCTIONS["default"])

    def system_segment(self) -> str:
        if not self.chat:
            return BASE_EXAMPLE
        glue = chat_frame(self.tokenizer, ("system", "user")).glue
        return glue[0] + self.system + glue[1] + "Sources:\n"

    def question_segment(self, question: str) -> str:
        if not self.chat:
            return f"Question: {question}\nAnswer:"
        glue = chat_frame(self.tokenizer, ("system", "user")).glue
        return f"Question: {question}\n\n{self.answer_instructions}" + glue[2]

    def segment_tokens(self, position: int, chunk: SourceChunk) -> list[int]:
        return chunk_segment(self.tokenizer, position, chunk)

    def build(
        self,
        chunks: Sequence[SourceChunk],
        question: str,
        history: Sequence[Turn] = (),
        history_chunks: Sequence[Sequence[SourceChunk]] = (),
    ) -> SegmentedPrompt:
        """The prompt for `question` over `chunks`, after earlier turns of the same conversation.

        A follow-up keeps every earlier segment exactly (so the conversation's cached path is
        reused) and appends the earlier answers, the new chunks and the new question.
        """
        segments: list[str | list[int]] = [self.system_segment()]
        kinds = ["system"]
        heads: list[int] = []  # per chunk segment: its marker's length
        position = 0
        turns = [*zip(history_chunks, history, strict=True), (chunks, None)]
        for turn_chunks, turn in turns:
            for chunk in turn_chunks:
                segment = self.segment_tokens(position, chunk)
                segments.append(segment)
                heads.append(len(segment) - len(chunk.token_ids) - len(self._tail()))
                kinds.append("chunk")
                position += 1
            if turn is None:
                segments.append(self.question_segment(question))
                kinds.append("question")
            else:
                segments.append(self.question_segment(turn.question))
                kinds.append("question")
                segments.append(list(turn.answer_tokens))
                kinds.append("answer")
                segments.append(self.follow_up_glue())
                kinds.append("template")
        prompt = encode_segments(self.tokenizer, segments, kinds)
        starts = [0, *prompt.boundaries[:-1]]
        chunk_starts = [a for a, k in zip(starts, prompt.kinds, strict=True) if k == "chunk"]
        ends = [b for b, k in zip(prompt.boundaries, prompt.kinds, strict=True) if k == "chunk"]
        spans = [(a + h, b) for a, b, h in zip(chunk_starts, ends, heads, strict=True)]
        return replace(prompt, chunk_spans=spans)

    def _tail(self) -> list[int]:
        return chunk_tail(self.tokenizer)

    def follow_up_glue(self) -> str:
        """Text between an answer and the next turn's sources."""
        if not self.chat:
            return "\n\nSources:\n"
        glue = chat_frame(self.tokenizer, ("system", "user", "assistant", "user")).glue
        return glue[3] + "Sources:\n"
