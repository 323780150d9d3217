"""Build the answering stack once: model -> prefix cache -> engine, store -> retriever -> answerer.

The CLI, the HTTP service and batch jobs all start here, so each gets the same wiring.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ragcache.answer import Answerer, AnswerSettings
from ragcache.cache import CacheSettings, PrefixCache
from ragcache.embedder import EmbedderSettings, SentenceTransformerEmbedder
from ragcache.engine import Engine
from ragcache.model_loader import LoadedModel, load_model
from ragcache.retrieve import RetrievalSettings, Retriever
from ragcache.settings import Settings
from ragcache.store import ChunkStore, StoreSettings, open_store
from ragcache.store_location import StoreLocation


@dataclass(frozen=True)
class StackOptions:
    db_dir: StoreLocation | None = None  # a folder or an object-store URI; default HOME/db
    table: str = "chunks"
    model: str | None = None  # default: settings.model.name
    cache: bool = True
    # Where the KV cache spills and persists; default settings.home / "kv". None with
    # cache_dir_off=True keeps the cache in RAM only.
    cache_dir: Path | None = None
    cache_dir_off: bool = False
    cache_settings: CacheSettings = field(default_factory=CacheSettings)
    retrieval: RetrievalSettings = field(default_factory=RetrievalSettings)
    answer: AnswerSettings = field(default_factory=AnswerSettings)
    embedder: EmbedderSettings = field(default_factory=EmbedderSettings)
    # Map the model's weights without reading them: a front whose replicas run the model
    # (serve.replicas) needs only its tokenizer, template and context length.
    lazy_model: bool = False


@dataclass
class Stack:
    loaded: LoadedModel
    cache: PrefixCache | None
    engine: Engine
    store: ChunkStore
    retriever: Retriever
    answerer: Answerer

    def close(self) -> None:
        """Stop the model worker, persist the cache's disk tier so the next process starts warm."""
        self.engine.close()
        if self.cache is not None:
            self.cache.flush()


def build_cache(
    loaded: LoadedModel, settings: Settings, options: StackOptions
) -> PrefixCache | None:
    if not options.cache:
        return None
    cache_settings = options.cache_settings
    if not options.cache_dir_off and cache_settings.disk_dir is None:
        cache_settings = replace(cache_settings, disk_dir=options.cache_dir or settings.home / "kv")
    return PrefixCache(loaded, cache_settings)


def build_stack(settings: Settings, options: StackOptions | None = None) -> Stack:
    """Load everything a question needs. Raises the errors of each part (model, store, ...)."""
    options = options or StackOptions()
    store = open_store(options.db_dir or settings.home / "db", StoreSettings(table=options.table))
    embedder = SentenceTransformerEmbedder(options.embedder)
    retriever = Retriever(store, embedder, options.retrieval)
    loaded = load_model(
        options.model or settings.model.name,
        settings.home,
        settings.model.quant,
        lazy=options.lazy_model,
    )
    cache = build_cache(loaded, settings, options)
    engine = Engine(loaded, settings.generation, cache)
    answerer = Answerer(engine, retriever, options.answer)
    return Stack(loaded, cache, engine, store, retriever, answerer)
