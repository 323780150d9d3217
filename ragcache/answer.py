"""Answering: retrieve -> order -> assemble -> generate (with the prefix cache) -> check -> cite.

`Answerer.ask` streams AnswerEvent records: the sources first, then text deltas (when the model
runs), then the final answer: checked against the sources (`ragcache.answer_policy`), with a quote
for every citation, or a decline. A `Conversation` carries earlier turns, so a follow-up question
extends the conversation's own path in the cache tree instead of starting over.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import PurePath

from ragcache.answer_policy import (
    ANSWER_MODES,
    AnswerPolicySettings,
    CheckedAnswer,
    decide,
    needs_generation,
)
from ragcache.attribution import attribute
from ragcache.engine import Completion, Engine, GenerationStats, TextDelta
from ragcache.errors import InvalidRequestError
from ragcache.evidence import EvidenceIndex, Passage, Quote, memoized
from ragcache.extract import Extraction, extract_answer
from ragcache.order import ORDERS, RankedChunk, order_chunks
from ragcache.rag_prompt import BASE_STOPS, PromptBuilder, SourceChunk, Turn
from ragcache.retrieve import Retriever
from ragcache.sampling import SamplingParams
from ragcache.segments import SegmentedPrompt
from ragcache.store import SearchHit, tokenizer_identity

_CITATION = re.compile(r"\[(\d{1,2})\]")


@dataclass(frozen=True)
class AnswerSettings:
    order: str = "cache"
    keep_top_at_edge: bool = True  # the lost-in-the-middle guard of ragcache.order
    max_tokens: int = 64  # answers are a sentence or two; the loop guard ends them earlier
    policy: AnswerPolicySettings = field(default_factory=AnswerPolicySettings)


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
    text: str = ""  # the chunk's text, so a reader can see the passage a quote comes from

    def as_dict(self) -> dict:
        return {**self.__dict__, "heading_path": list(self.heading_path)}


@dataclass
class Conversation:
    """Earlier turns of one conversation; `ask` appends to it."""

    turns: list[Turn] = field(default_factory=list)
    turn_chunks: list[list[SourceChunk]] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    passages: list[Passage] = field(
        default_factory=list
    )  # earlier turns' evidence, still in context


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
    drafted_tokens: int = 0  # speculation: draft tokens the model checked
    accepted_tokens: int = 0  # of those, the ones it agreed with


@dataclass(frozen=True)
class SourcesEvent:
    sources: list[Source]  # in prompt order
    order: str


@dataclass(frozen=True)
class Citation:
    """One cited sentence of the answer and the passage span that supports it."""

    sentence: int  # index of the answer sentence it supports
    source: Source
    quote: Quote

    def as_dict(self) -> dict:
        return {"sentence": self.sentence, "chunk_id": self.source.chunk_id, **self.quote.as_dict()}


@dataclass(frozen=True)
class AnswerDone:
    text: str  # what the user reads (checked); the model's own text is `completion.text`
    citations: list[Source]  # sources the answer cites, in order of first citation
    sources: list[Source]
    figures: Figures
    completion: Completion  # empty (no tokens) when the answer was quoted or declined unrun
    method: str = "generated"  # "generated", "extracted" or "declined"
    quotes: list[Citation] = field(default_factory=list)
    confidence: float = 0.0

    @property
    def declined(self) -> bool:
        return self.method == "declined"


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
    mode: str = "auto"
    evidence: EvidenceIndex | None = None
    extraction: Extraction | None = None
    generate: bool = True  # False: the answer is a quote or a decline, the model need not run


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
        self.builder = PromptBuilder(loaded.tokenizer, loaded.chat, family=loaded.family)
        self.tokenizer_id = tokenizer_identity(loaded.path) if loaded.path else ""
        embedder = getattr(retriever, "embedder", None)
        self.embed = memoized(embedder.embed) if embedder is not None else None

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
        mode: str | None = None,
    ) -> PreparedQuestion:
        """Retrieve, order, assemble and find the evidence; no generation. Thread-safe besides
        the conversation.

        Raises InvalidRequestError (empty question, k, order, mode, empty store),
        PromptTooLongError.
        """
        order = order or self.settings.order
        if order not in ORDERS:
            raise InvalidRequestError(
                f"unknown order {order!r}", hint="one of: " + ", ".join(ORDERS)
            )
        mode = mode or self.settings.policy.mode
        if mode not in ANSWER_MODES:
            raise InvalidRequestError(
                f"unknown answer mode {mode!r}", hint="one of: " + ", ".join(ANSWER_MODES)
            )
        conversation = conversation if conversation is not None else Conversation()
        seen = {c.chunk_id for turn in conversation.turn_chunks for c in turn}
        retrieval = self.retriever.retrieve(question, k, where, exclude=frozenset(seen))
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
                    h.text,
                )
            )
        rank = {h.chunk_id: i for i, h in enumerate(retrieval.hits)}
        passages = [
            Passage(
                s.number,
                s.chunk_id,
                _shown_title(s),
                by_id[s.chunk_id].text,
                " > ".join(s.heading_path),
                opens_document=s.position == 0,
            )
            for s in sources
        ]
        # A follow-up may be answered by an earlier turn's sources: they are still in the prompt.
        earlier = conversation.passages
        evidence = EvidenceIndex(
            [*earlier, *passages],
            self.embed,
            ranks=[len(rank) + i for i in range(len(earlier))]
            + [rank[s.chunk_id] for s in sources],
        )
        extraction = extract_answer(
            question, evidence, self.settings.policy.extract, retrieval.query_vector
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
            mode,
            evidence,
            extraction,
            needs_generation(mode, extraction, self.settings.policy),
        )

    def complete(
        self, prepared: PreparedQuestion, completion: Completion | None, started: float
    ) -> AnswerDone:
        """Check the answer against the sources, record the turn in the conversation and build
        the final answer record. `completion` is None when the model did not run."""
        policy = self.settings.policy
        attributed = None
        if completion is not None and prepared.evidence is not None:
            attributed = attribute(
                completion.text, prepared.evidence, policy.attribution, self.embed
            )
        checked = decide(
            prepared.mode,
            prepared.extraction,
            attributed,
            policy,
            completion.text if completion is not None else "",
        )
        if completion is None:
            completion = _unrun(prepared, checked, started)
        conversation = prepared.conversation
        all_sources = conversation.sources + prepared.sources
        # The conversation goes on from what the model said when it ran (its tokens are cached).
        answer_tokens = completion.tokens or self.engine.loaded.tokenizer.encode(
            checked.text, add_special_tokens=False
        )
        conversation.turns.append(Turn(prepared.question, answer_tokens))
        conversation.turn_chunks.append(prepared.chunks)
        conversation.sources.extend(prepared.sources)
        if prepared.evidence is not None:
            conversation.passages = list(prepared.evidence.passages)
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
            drafted_tokens=s.drafted_tokens,
            accepted_tokens=s.accepted_tokens,
        )
        by_number = {x.number: x for x in all_sources}
        quotes = [
            Citation(i, by_number[q.number], q)
            for i, q in enumerate(checked.quotes)
            if q.number in by_number
        ]
        return AnswerDone(
            checked.text,
            cited(checked.text, all_sources),
            prepared.sources,
            figures,
            completion,
            checked.method,
            quotes,
            round(checked.confidence, 4),
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
        mode: str | None = None,
    ) -> Iterator[AnswerEvent]:
        """Stream the answer to `question` with this thread running the engine.

        Raises what `prepare` raises before yielding anything.
        """
        started = time.perf_counter()
        prepared = self.prepare(question, k, order, where, conversation, mode)
        yield SourcesEvent(prepared.sources, prepared.order)
        completion: Completion | None = None
        if prepared.generate:
            params = params or SamplingParams(max_tokens=self.settings.max_tokens)
            if not self.engine.loaded.chat and not params.stop:
                params = replace(params, stop=BASE_STOPS)
            for event in self.engine.stream(prepared.prompt, params, cancel):
                if isinstance(event, Completion):
                    completion = event
                else:
                    yield event
            assert completion is not None
        yield self.complete(prepared, completion, started)


def _shown_title(source: Source) -> str:
    """A title worth showing: not the file name a document without a heading falls back to."""
    title = source.title.strip()
    return (
        "" if title in {"", PurePath(source.doc_id).stem, PurePath(source.doc_id).name} else title
    )


def _unrun(prepared: PreparedQuestion, checked: CheckedAnswer, started: float) -> Completion:
    """The record of a generation that did not run: nothing computed, nothing cached."""
    elapsed = time.perf_counter() - started
    reason = "declined" if checked.declined else "extracted"
    stats = GenerationStats(0, 0, 0, 0, elapsed, 0.0, 0.0, 0, reason)
    return Completion("", [], stats)
