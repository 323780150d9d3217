"""Retrieval: embed the question, search the store (vector, full text or hybrid), top-k."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from itertools import chain, zip_longest

import numpy as np

from ragcache.embedder import Embedder
from ragcache.errors import ConfigError, InvalidRequestError
from ragcache.sentences import identifiers, mentions
from ragcache.store import ChunkStore, SearchHit

SEARCH_MODES = ("hybrid", "vector", "fts")


@dataclass(frozen=True)
class RetrievalSettings:
    k: int = 5
    max_k: int = 50
    mode: str = "hybrid"  # vector and full-text results fused (the store's fusion settings)
    # A question that names an identifier (`core.deltaBaseCacheLimit`, `--stdin-packs`) is found
    # by its exact words: the embedder sees such a name as a few common word pieces. The vector
    # arm's weight in the fusion for such questions (None: the store's weight for every question).
    identifier_vector_weight: float | None = 0.3
    # A name the question uses (`format.numbered`, `PyErr_Print`) that none of the top-k chunks
    # mentions is looked up in the whole store: up to this many chunks that name it (one per
    # name in turn) take the last places, never the top hit's. Ranking can miss a definition
    # whose only match is the exact name (a long list of configuration variables); a name the
    # store never mentions stays unknown, and the answer is declined
    # (`ragcache.extract.unknown_names`). 0: no lookup. Full-text mode searches words already.
    name_lookup: int = 2


@dataclass(frozen=True)
class Retrieval:
    hits: list[SearchHit]
    retrieval_ms: float
    query_vector: np.ndarray | None = None  # the question's embedding, when the mode made one


class Retriever:
    """Finds the chunks for a question. Read-only; safe to share across threads."""

    def __init__(
        self, store: ChunkStore, embedder: Embedder, settings: RetrievalSettings | None = None
    ) -> None:
        """Raises ConfigError when the store was made with another embedder (dimension or id)."""
        self.store = store
        self.embedder = embedder
        self.settings = settings or RetrievalSettings()
        if store.dim != embedder.dim:
            raise ConfigError(
                f"the store holds {store.dim}-dimensional vectors but the embedder makes "
                f"{embedder.dim}: it was built with another embedder",
                hint="re-ingest into a new --db folder, or use the embedder the store was built with",
            )
        if self.settings.name_lookup < 0:
            raise ConfigError(
                f"name_lookup must be 0 or more, got {self.settings.name_lookup}",
                hint="0 turns the lookup of a question's names off",
            )
        if self.settings.mode not in SEARCH_MODES:
            raise ConfigError(
                f"unknown search mode {self.settings.mode!r}", hint=", ".join(SEARCH_MODES)
            )

    def retrieve(
        self,
        question: str,
        k: int | None = None,
        where: str | None = None,
        exclude: frozenset[str] = frozenset(),
    ) -> Retrieval:
        """Top-k chunks for `question`, best first. `exclude`: chunk ids already in the
        conversation, which the name lookup does not spend a place on.

        Raises InvalidRequestError on an empty question, k out of range, or an empty store.
        """
        if not question or not question.strip():
            raise InvalidRequestError("the question is empty", hint="ask something")
        k = self.settings.k if k is None else k
        if not 1 <= k <= self.settings.max_k:
            raise InvalidRequestError(f"k must be between 1 and {self.settings.max_k}, got {k}")
        if self.store.count() == 0:
            raise InvalidRequestError(
                "the store is empty", hint="ingest documents first: ragcache ingest PATH"
            )
        start = time.perf_counter()
        mode = self.settings.mode
        vector = None
        if mode == "fts":
            hits = self.store.search_text(question, k, where)
        else:
            vector = self.embedder.embed_query(question)
            if mode == "vector":
                hits = self.store.search_vector(vector, k, where)
            else:
                weight = self.settings.identifier_vector_weight if identifiers(question) else None
                hits = self.store.search_hybrid(question, vector, k, where, weight)
            hits = self._with_named(question, hits, vector, k, where, exclude)
        return Retrieval(hits, (time.perf_counter() - start) * 1000, vector)

    def _with_named(
        self,
        question: str,
        hits: list[SearchHit],
        vector: np.ndarray,
        k: int,
        where: str | None,
        exclude: frozenset[str],
    ) -> list[SearchHit]:
        """`hits` with chunks that name the question's unmatched names in their last places:
        one per name in turn, never the top hit, never a chunk in `exclude`."""
        n = min(self.settings.name_lookup, k - 1)
        if n <= 0:
            return hits
        missing = [
            name
            for name in sorted(identifiers(question))
            if len(name) > 3 and not any(mentions(h.text, name) for h in hits)
        ]
        taken = {h.chunk_id for h in hits} | exclude
        per_name = [
            self.store.search_mentioning(name, vector, n + len(taken), where) for name in missing
        ]
        found: list[SearchHit] = []
        # Round robin over the names' candidates, best first: a second name gets a place too.
        for hit in chain.from_iterable(zip_longest(*per_name)):
            if hit is not None and hit.chunk_id not in taken and len(found) < n:
                found.append(hit)
                taken.add(hit.chunk_id)
        if not found:
            return hits
        free = max(0, k - len(hits))  # a small store may have returned fewer than k
        keep = hits[: len(hits) - max(0, len(found) - free)]
        # A looked-up chunk takes the place, and the score, of the hit it displaces, so score
        # order still is rank order (its own score is a cosine, not the fused score); past the
        # last hit, a score just below it, so no tie puts it above a retrieved chunk.
        scores = [h.score for h in hits[len(keep) :]]
        floor = min((h.score for h in hits), default=0.0)
        while len(scores) < len(found):
            floor = float(np.nextafter(floor, -np.inf))
            scores.append(floor)
        return keep + [replace(h, score=score) for h, score in zip(found, scores, strict=True)]
