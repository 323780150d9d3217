"""Answering: retrieve -> order -> assemble -> generate (with the prefix cache) -> cite.

`Answerer.ask` streams AnswerEvent records: the sources first, then text deltas, then the final
answer with citations and figures. A `Conversation` carries earlier turns, so a follow-up question
extends the conversation's own path in the cache tree instead of starting over.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ragcache.engine import Completion, Engine, TextDelta
from ragcache.errors import InvalidRequestError
from ragcache.order import ORDERS, RankedChunk, order_chunks
from ragcache.rag_prompt import PromptBuilder, SourceChunk, Turn
from ragcache.retrieve import Retriever
from ragcache.sampling import SamplingParams
from ragcache.segments import SegmentedPrompt
from ragcache.store import SearchHit, tokenizer_identity

_CITATION = re.compile(r"\[(\d{1,2})\]")


@dataclass(frozen=True)
class AnswerSettings:
    order: str = "cache"
    keep_top_at_edge: bool = True  # the lost-in-the-middle guard of ragcache.order


@dataclass(frozen=True)
class Source:
    """A chunk as it was numbered in the prompt, for citations."""

    number: int  # the [n] marker in the prompt, 1-based
    chunk_id: str
    doc_id: str
    source: str
    title: str
    heading_path: tuple[str, ...]
    position: int
    score: float

    def as_dict(self) -> dict:
        return {**self.__dict__, "heading_path": list(self.heading_path)}


@dataclass
class Conversation:
    """Earlier turns of one conversation; `ask` appends to it."""

    turns: list[Turn] = field(default_factory=list)
    turn_chunks: list[list[SourceChunk]] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)


@dataclass(frozen=True)
class Figures:
    retrieval_ms: float
    order_ms: float
    prompt_tokens: int
    cached_tokens: int
    recomputed_tokens: int
    generated_tokens: int
    ttft_s: float
    prefill_tps: float
    decode_tps: float
    total_s: float
    finish_reason: str


@dataclass(frozen=True)
class SourcesEvent:
    sources: list[Source]  # in prompt order
    order: str


@dataclass(frozen=True)
class AnswerDone:
    text: str
    citations: list[Source]  # sources the answer cites, in order of first citation
    sources: list[Source]
    figures: Figures
    completion: Completion


AnswerEvent = SourcesEvent | TextDelta | AnswerDone


@dataclass(frozen=True)
class PreparedQuestion:
    """A question ready for generation: its prompt, and what the answer record needs."""

    question: str
    order: str
    prompt: SegmentedPrompt
    sources: list[Source]
    chunks: list[SourceChunk]
    conversation: Conversation
    retrieval_ms: float
    order_ms: float


def cited(text: str, sources: Sequence[Source]) -> list[Source]:
    by_number = {s.number: s for s in sources}
    out: list[Source] = []
    for m in _CITATION.finditer(text):
        source = by_number.get(int(m.group(1)))
        if source is not None and source not in out:
            out.append(source)
    return out


class Answerer:
    """Answers questions over one store with one engine. One caller at a time (the worker)."""

    def __init__(
        self, engine: Engine, retriever: Retriever, settings: AnswerSettings | None = None
    ) -> None:
        self.engine = engine
        self.retriever = retriever
        self.settings = settings or AnswerSettings()
        loaded = engine.loaded
        self.builder = PromptBuilder(loaded.tokenizer, loaded.chat)
        self.tokenizer_id = tokenizer_identity(loaded.path) if loaded.path else ""

    def _source_chunk(self, hit: SearchHit) -> SourceChunk:
        ids = hit.token_ids
        if hit.tokenizer_id != self.tokenizer_id or not ids:
            # Stored ids come from another tokenizer: tokenize the text, on its own as ingest does.
            ids = tuple(self.engine.loaded.tokenizer.encode(hit.text, add_special_tokens=False))
        heading = " > ".join(hit.heading_path)
        return SourceChunk(hit.chunk_id, hit.title or hit.source, heading, ids)

    def prepare(
        self,
        question: str,
        k: int | None = None,
        order: str | None = None,
        where: str | None = None,
        conversation: Conversation | None = None,
    ) -> PreparedQuestion:
        """Retrieve, order and assemble; no generation. Thread-safe besides the conversation.

        Raises InvalidRequestError (empty question, k, order, empty store), PromptTooLongError.
        """
        order = order or self.settings.order
        if order not in ORDERS:
            raise InvalidRequestError(
                f"unknown order {order!r}", hint="one of: " + ", ".join(ORDERS)
            )
        conversation = conversation if conversation is not None else Conversation()
        retrieval = self.retriever.retrieve(question, k, where)
        seen = {c.chunk_id for turn in conversation.turn_chunks for c in turn}
        hits = [h for h in retrieval.hits if h.chunk_id not in seen]  # already in the context
        by_id = {h.chunk_id: h for h in hits}
        chunks = {h.chunk_id: self._source_chunk(h) for h in hits}

        t_order = time.perf_counter()
        history = self.builder.build([], "", conversation.turns, conversation.turn_chunks)
        # Everything before this turn's chunks is fixed; the ordering walks on from there.
        fixed = history.tokens[: history.boundaries[-2]] if len(history.boundaries) > 1 else []
        offset = sum(len(t) for t in conversation.turn_chunks)
        segments: dict[tuple[int, str], list[int]] = {}

        def segment_at(pos: int, cid: str) -> list[int]:
            if (pos, cid) not in segments:
                segments[pos, cid] = self.builder.segment_tokens(offset + pos, chunks[cid])
            return segments[pos, cid]

        root = getattr(getattr(self.engine.cache, "tree", None), "root", None)
        ordering = order_chunks(
            [RankedChunk(h.chunk_id, h.score) for h in hits],
            order,
            root,
            fixed,
            segment_at,
            self.settings.keep_top_at_edge,
        )
        ordered = [chunks[c] for c in ordering.chunk_ids]
        order_ms = (time.perf_counter() - t_order) * 1000
        prompt = self.builder.build(ordered, question, conversation.turns, conversation.turn_chunks)
        self.engine.check_fits(len(prompt.tokens))
        sources = []
        for i, c in enumerate(ordered):
            h = by_id[c.chunk_id]
            sources.append(
                Source(
                    offset + i + 1,
                    c.chunk_id,
                    h.doc_id,
                    h.source,
                    h.title,
                    h.heading_path,
                    h.position,
                    h.score,
                )
            )
        return PreparedQuestion(
            question,
            order,
            prompt,
            sources,
            ordered,
            conversation,
            retrieval.retrieval_ms,
            order_ms,
        )

    def complete(
        self, prepared: PreparedQuestion, completion: Completion, started: float
    ) -> AnswerDone:
        """Record the turn in the conversation and build the final answer record."""
        conversation = prepared.conversation
        all_sources = conversation.sources + prepared.sources
        conversation.turns.append(Turn(prepared.question, completion.tokens))
        conversation.turn_chunks.append(prepared.chunks)
        conversation.sources.extend(prepared.sources)
        s = completion.stats
        figures = Figures(
            retrieval_ms=round(prepared.retrieval_ms, 2),
            order_ms=round(prepared.order_ms, 3),
            prompt_tokens=s.prompt_tokens,
            cached_tokens=s.cached_tokens,
            recomputed_tokens=s.recomputed_tokens,
            generated_tokens=s.generated_tokens,
            ttft_s=round(s.ttft_s, 4),
            prefill_tps=round(s.prefill_tps, 1),
            decode_tps=round(s.decode_tps, 2),
            total_s=round(time.perf_counter() - started, 3),
            finish_reason=s.finish_reason,
        )
        return AnswerDone(
            completion.text,
            cited(completion.text, all_sources),
            prepared.sources,
            figures,
            completion,
        )

    def ask(
        self,
        question: str,
        k: int | None = None,
        order: str | None = None,
        params: SamplingParams | None = None,
        where: str | None = None,
        conversation: Conversation | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[AnswerEvent]:
        """Stream the answer to `question` with this thread running the engine.

        Raises what `prepare` raises before yielding anything.
        """
        started = time.perf_counter()
        prepared = self.prepare(question, k, order, where, conversation)
        yield SourcesEvent(prepared.sources, prepared.order)
        completion: Completion | None = None
        for event in self.engine.stream(prepared.prompt, params, cancel):
            if isinstance(event, Completion):
                completion = event
            else:
                yield event
        assert completion is not None
        yield self.complete(prepared, completion, started)
