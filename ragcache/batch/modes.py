"""How a batch turns a question into a prompt and a completion into an answer.

A mode is the part that differs between RAG batches (retrieve per question) and long-context
batches (one shared document prefix); scheduling, running and writing are the same for both.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol

from ragcache.answer import Answerer, PreparedQuestion
from ragcache.batch.formats import BatchRequest, Citation
from ragcache.engine import Completion
from ragcache.rag_prompt import BASE_STOPS
from ragcache.sampling import SamplingParams
from ragcache.segments import SegmentedPrompt

# Base models run on past their answer into the next "Question:"; a blank line ends an answer.


@dataclass(frozen=True)
class Prepared:
    """A request ready to run: its prompt and sampling, and what the mode needs to finish it."""

    request: BatchRequest
    prompt: SegmentedPrompt
    params: SamplingParams
    context: Any = None  # mode-specific (RAG: the PreparedQuestion)
    key: tuple | None = None  # what the schedule sorts on, when not the prompt's segments
    wait_tokens: int = 0  # prompt tokens shared with its leader (set by the job when scheduled)

    def segment_keys(self) -> tuple:
        """What the schedule sorts on: `key`, else each segment's token ids (equal ids share KV)."""
        if self.key is not None:
            return self.key
        tokens, cuts = self.prompt.tokens, [0, *self.prompt.boundaries]
        return tuple(tuple(tokens[a:b]) for a, b in zip(cuts, cuts[1:], strict=False))

    def shared_tokens(self, n_segments: int) -> int:
        return self.prompt.boundaries[n_segments - 1] if n_segments else 0


@dataclass(frozen=True)
class Answer:
    text: str
    citations: list[Citation]


class Mode(Protocol):
    name: str

    def prepare(self, request: BatchRequest, params: SamplingParams) -> Prepared:
        """Build the prompt; raises RagcacheError (e.g. PromptTooLongError) for this request."""
        ...

    def refresh(self, prepared: Prepared) -> Prepared:
        """Rebuild the prompt just before it runs, for what the cache holds by then."""
        ...

    def finish(self, prepared: Prepared, completion: Completion, started: float) -> Answer: ...


def sampling_for(chat: bool, params: SamplingParams) -> SamplingParams:
    return params if chat or params.stop else replace(params, stop=BASE_STOPS)


class RagMode:
    """Every question retrieves its own chunks through `Answerer.prepare`."""

    name = "rag"

    def __init__(
        self,
        answerer: Answerer,
        k: int | None = None,
        order: str | None = None,
        where: str | None = None,
    ) -> None:
        self.answerer = answerer
        self.k, self.order, self.where = k, order, where

    def prepare(self, request: BatchRequest, params: SamplingParams) -> Prepared:
        """Retrieve and assemble. The schedule key is the system segment, then the chunk ids in
        canonical order: questions with the same sources group together whatever order their
        prompts get, and `refresh` then orders each one along what its neighbours cached."""
        prepared = self.answerer.prepare(request.question, self.k, self.order, self.where)
        chat = self.answerer.engine.loaded.chat
        prompt = prepared.prompt
        system = tuple(prompt.tokens[: prompt.boundaries[0]])
        key = (system, *sorted(c.chunk_id for c in prepared.chunks), request.question)
        return Prepared(request, prompt, sampling_for(chat, params), prepared, key)

    def refresh(self, prepared: Prepared) -> Prepared:
        """Order the chunks again against the tree as it is now (cache order only).

        At prepare time the tree lacked what earlier questions of the batch have since cached;
        retrieval is deterministic, so only the order can change.
        """
        question: PreparedQuestion = prepared.context
        if question.order != "cache":
            return prepared
        again = self.answerer.prepare(question.question, self.k, question.order, self.where)
        return replace(prepared, prompt=again.prompt, context=again)

    def finish(self, prepared: Prepared, completion: Completion, started: float) -> Answer:
        question: PreparedQuestion = prepared.context
        done = self.answerer.complete(question, completion, started)
        citations = [Citation(s.number, s.source, s.chunk_id, s.title) for s in done.citations]
        return Answer(done.text, citations)
