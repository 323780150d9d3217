"""The chunk store: one LanceDB table of chunks, vectors and generator token ids.

Every write is one LanceDB commit, and LanceDB commits are atomic: a reader (or a rerun after a
SIGKILL) sees a table version from before or after a commit, never part of one. `replace_docs`
swaps all chunks of a set of documents in a single merge-insert, so each stored document always
has exactly the chunks of one of its versions. One writer at a time: the ingest job holds a lock.

Search: vector (cosine), full-text (LanceDB's native BM25 index), and hybrid: the two fused by
a weighted sum of normalised scores (or reciprocal rank fusion, a setting). Nothing here imports ingest/: the query path uses this module alone.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ragcache.errors import InvalidRequestError, RagcacheError
from ragcache.sentences import mentions
from ragcache.store_location import StoreLocation, normalise

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
_META_VERSION = b"ragcache.schema_version"
_META_EMBEDDER = b"ragcache.embedder"


class StoreError(RagcacheError):
    """The store cannot be opened or written as asked."""

    exit_code = 6
    http_status = 500


class StoreBusyError(StoreError):
    """Another job holds the table's write lock: nothing is wrong, the write can simply be retried."""

    exit_code = 75  # EX_TEMPFAIL
    http_status = 503

    def __init__(self, message: str, hint: str | None = None, retry_after_s: float = 10.0) -> None:
        super().__init__(message, hint)
        self.retry_after_s = retry_after_s


class SchemaMismatchError(StoreError):
    """The table on disk was made by another schema version or another embedder."""

    http_status = 409


@dataclass(frozen=True)
class StoreSettings:
    table: str = "chunks"
    # Below this many rows a flat scan is fast (about 1 ms per 1k rows here), and IVF-PQ training
    # costs more than it saves; above it the vector index is built after the job.
    vector_index_min_rows: int = 10_000
    # Rows each search arm hands to the fusion; more helps hybrid recall at a small cost.
    fusion_candidates: int = 50
    # "convex": weighted sum of min-max normalised scores (Bruch et al. 2022); "rrf": reciprocal
    # rank fusion. On python_docs, BM25 is far weaker than the embedder and equal-weight RRF fell
    # below vector search alone (recall@5 0.766 vs 0.825); convex with vector_weight 0.6, picked
    # on the even-numbered half of the questions, beat it on the held-out half (0.812 vs 0.776).
    fusion: str = "convex"
    vector_weight: float = 0.6
    rrf_k: int = 60  # the constant of reciprocal rank fusion (Cormack et al. use 60)
    nprobes: int = 20
    refine_factor: int = 5  # re-rank PQ candidates with exact vectors


@dataclass(frozen=True)
class DocState:
    """What the table holds for one document: enough to tell unchanged, changed or incomplete."""

    doc_id: str
    source: str
    doc_hashes: frozenset[str]
    doc_chunks: int  # chunk count the stored version declares
    chunk_ids: tuple[str, ...]
    ingested_at: datetime | None = None  # its latest chunk's write

    def is_complete(self, doc_hash: str) -> bool:
        """True when the table holds exactly the chunks of version `doc_hash`, no more, no less."""
        return (
            self.doc_hashes == {doc_hash}
            and len(self.chunk_ids) == self.doc_chunks
            and len(set(self.chunk_ids)) == len(self.chunk_ids)
        )


@dataclass(frozen=True)
class SearchHit:
    """One retrieved chunk with what the prompt and the citation need."""

    chunk_id: str
    doc_id: str
    source: str
    title: str
    heading_path: tuple[str, ...]
    position: int
    text: str
    n_tokens: int
    token_ids: tuple[int, ...]
    tokenizer_id: str  # token_ids are only valid for this tokenizer
    score: float  # cosine similarity, BM25 score, or fused RRF score: compare within one mode


def chunk_schema(dim: int, embedder_id: str) -> pa.Schema:
    """The table's schema; its metadata carries the schema version and the embedder identity."""
    return pa.schema(
        [
            pa.field("chunk_id", pa.string(), nullable=False),
            pa.field("doc_id", pa.string(), nullable=False),
            pa.field("source", pa.string()),
            pa.field("title", pa.string()),
            pa.field("heading_path", pa.list_(pa.string())),
            pa.field("position", pa.int32()),
            pa.field("text", pa.string()),
            pa.field("n_tokens", pa.int32()),
            pa.field("content_hash", pa.string()),  # of the chunk text
            pa.field("doc_hash", pa.string()),  # of the document version (content + pipeline)
            pa.field("doc_chunks", pa.int32()),  # chunks in that version: completeness check
            pa.field("metadata", pa.string()),  # JSON
            pa.field("vector", pa.list_(pa.float32(), dim)),
            pa.field("token_ids", pa.list_(pa.int32())),
            pa.field("tokenizer_id", pa.string()),
            pa.field("ingested_at", pa.timestamp("us", tz="UTC")),
        ],
        metadata={_META_VERSION: SCHEMA_VERSION.encode(), _META_EMBEDDER: embedder_id.encode()},
    )


def forget_shadowing_datasets() -> None:
    """Drop a namespace package named `datasets` (this repository's datasets/ folder, when the
    working directory is on sys.path) from sys.modules.

    transformers imports it while probing for Hugging Face `datasets`; LanceDB then sees the name
    in sys.modules and fails importing `datasets.Dataset` on every write.
    """
    module = sys.modules.get("datasets")
    if module is not None and getattr(module, "__file__", None) is None:
        del sys.modules["datasets"]


def tokenizer_identity(folder: Path) -> str:
    """A short hash of a model folder's tokenizer files: stored token ids are valid only under it."""
    digest = hashlib.sha256()
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
    ):
        path = folder / name
        if path.exists():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def check_where(where: str) -> str:
    """`where` if it is one SQL condition; raises InvalidRequestError for a second statement.

    LanceDB evaluates the text up to the first `;` and silently ignores the rest, so
    `"doc_id = 'a'; DELETE ..."` would run as a filter the caller never wrote. A `;` inside a
    quoted string or identifier is text, not a separator.
    """
    quote = ""
    for char in where:
        if quote:
            if char == quote:
                quote = ""  # a doubled quote ('') closes and reopens: the same state
        elif char in "'\"":
            quote = char
        elif char == ";":
            raise InvalidRequestError(
                f"the where filter holds a second statement after ';': {where[:200]!r}",
                hint="one SQL condition on chunk columns, e.g. \"source LIKE '%faq%'\"",
            )
    return where


def sql_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def like_pattern(text: str) -> str:
    """A quoted LIKE pattern that finds `text` (lower-cased) anywhere, its `%`, `_` and `\\`
    taken literally (with `ESCAPE '\\'`)."""
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return sql_quote(f"%{escaped}%")


def in_list(column: str, values: Iterable[str]) -> str:
    return f"{column} IN ({', '.join(sql_quote(v) for v in values)})"


_HIT_COLUMNS = [
    "chunk_id", "doc_id", "source", "title", "heading_path", "position", "text", "n_tokens",
    "token_ids", "tokenizer_id",
]  # fmt: skip


class ChunkStore:
    """A LanceDB chunk table. Create with `open_store`."""

    def __init__(self, table: Any, settings: StoreSettings, db: Any = None) -> None:
        self.table = table
        self.settings = settings
        self.db = db  # the connection, for reading past versions beside the live handle

    @property
    def version(self) -> int:
        """The table version this handle reads (each commit makes a new one)."""
        return int(self.table.version)

    def refresh(self) -> int:
        """See the latest commit, whichever process made it; return the version now read.

        A handle keeps reading the version it opened until told otherwise: another process's
        ingest job is invisible to it until then.
        """
        self.table.checkout_latest()
        return self.version

    def chunk_ids(self) -> set[str]:
        """Every chunk id in the table (one column read)."""
        data = self.table.search().select(["chunk_id"]).limit(None).to_arrow()
        return set(data["chunk_id"].to_pylist())

    def rows_at(self, version: int, chunk_ids: Sequence[str], columns: Sequence[str]) -> list[dict]:
        """Columns of `chunk_ids` as they were at table `version` (LanceDB keeps past versions
        until compaction cleans them up); [] when that version is gone."""
        if not chunk_ids or self.db is None:
            return []
        try:
            past = self.db.open_table(self.settings.table)
            past.checkout(version)
        except Exception as exc:  # cleaned up by optimize(), or never existed
            log.info("table version %s is no longer readable: %s", version, exc)
            return []
        out: list[dict] = []
        ids = list(chunk_ids)
        for i in range(0, len(ids), 1000):
            query = past.search().where(in_list("chunk_id", ids[i : i + 1000]))
            out.extend(query.select(list(columns)).limit(None).to_arrow().to_pylist())
        return out

    @property
    def embedder_id(self) -> str:
        return (self.table.schema.metadata or {}).get(_META_EMBEDDER, b"").decode()

    @property
    def dim(self) -> int:
        return self.table.schema.field("vector").type.list_size

    def count(self) -> int:
        return self.table.count_rows()

    def doc_states(self) -> dict[str, DocState]:
        """Per-document state of the whole table (reads ids and hashes only, not vectors)."""
        cols = ["doc_id", "source", "chunk_id", "doc_hash", "doc_chunks", "ingested_at"]
        data = self.table.search().select(cols).limit(None).to_arrow().to_pydict()
        grouped: dict[str, list[int]] = {}
        for i, doc_id in enumerate(data["doc_id"]):
            grouped.setdefault(doc_id, []).append(i)
        return {
            doc_id: DocState(
                doc_id=doc_id,
                source=data["source"][rows[0]] or "",
                doc_hashes=frozenset(data["doc_hash"][i] for i in rows),
                doc_chunks=min(data["doc_chunks"][i] for i in rows),
                chunk_ids=tuple(data["chunk_id"][i] for i in rows),
                ingested_at=max(
                    (data["ingested_at"][i] for i in rows if data["ingested_at"][i]), default=None
                ),
            )
            for doc_id, rows in grouped.items()
        }

    def replace_docs(self, rows: pa.Table, doc_ids: Sequence[str]) -> None:
        """Make `rows` the only chunks of `doc_ids`, in one atomic commit.

        Rows match on chunk_id (an unchanged chunk keeps its id and is updated in place); chunks of
        these documents missing from `rows` are deleted in the same commit.
        """
        if not doc_ids:
            return
        forget_shadowing_datasets()
        (
            self.table.merge_insert("chunk_id")
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .when_not_matched_by_source_delete(in_list("doc_id", doc_ids))
            .execute(rows.cast(self.table.schema))
        )

    def delete_docs(self, doc_ids: Sequence[str], batch: int = 500) -> None:
        """Delete every chunk of `doc_ids`; one commit per `batch` documents."""
        for i in range(0, len(doc_ids), batch):
            self.table.delete(in_list("doc_id", doc_ids[i : i + batch]))

    def maintain(self, compact: bool) -> list[str]:
        """Build missing indexes and, if `compact`, merge small fragments and fold new rows into the
        indexes. Returns what it did, for the job report. Each step is its own atomic commit."""
        done: list[str] = []
        indexed = {tuple(i.columns): i for i in self.table.list_indices()}
        n_rows = self.count()
        if n_rows and ("text",) not in indexed:
            from lancedb.index import FTS

            self.table.create_index("text", config=FTS(), replace=True)
            done.append("built full-text index")
        if n_rows >= self.settings.vector_index_min_rows and ("vector",) not in indexed:
            from lancedb.index import IvfPq

            self.table.create_index(
                "vector",
                config=IvfPq(
                    distance_type="cosine",
                    num_partitions=max(1, int(math.sqrt(n_rows))),
                    num_sub_vectors=_sub_vectors(self.dim),
                ),
            )
            done.append(f"built IVF-PQ vector index over {n_rows} rows")
        if compact:
            self.table.optimize(cleanup_older_than=timedelta(days=1))
            done.append("compacted fragments and updated indexes")
        return done

    def search_vector(
        self, vector: np.ndarray, k: int = 10, where: str | None = None
    ) -> list[SearchHit]:
        """Nearest chunks by cosine similarity; `where` is an SQL filter applied before the search."""
        query = (
            self.table.search(np.asarray(vector, dtype=np.float32), vector_column_name="vector")
            .distance_type("cosine")
            .nprobes(self.settings.nprobes)
            .refine_factor(self.settings.refine_factor)
            .select([*_HIT_COLUMNS, "_distance"])
            .limit(k)
        )
        if where:
            query = query.where(check_where(where), prefilter=True)
        rows = query.to_arrow().to_pylist()
        return [_hit(r, 1.0 - float(r["_distance"])) for r in rows]

    def search_text(self, text: str, k: int = 10, where: str | None = None) -> list[SearchHit]:
        """Best BM25 matches of `text` (words, not query syntax) in the chunk texts."""
        from lancedb.query import MatchQuery

        if not text.strip():
            return []
        query = (
            self.table.search(MatchQuery(text, "text"), query_type="fts")  # type: ignore[call-arg]
            .select([*_HIT_COLUMNS, "_score"])
            .limit(k)
        )
        if where:
            query = query.where(check_where(where), prefilter=True)
        return [_hit(r, float(r["_score"])) for r in query.to_arrow().to_pylist()]

    def search_hybrid(
        self,
        text: str,
        vector: np.ndarray,
        k: int = 10,
        where: str | None = None,
        vector_weight: float | None = None,
    ) -> list[SearchHit]:
        """Vector and full-text results fused (`settings.fusion`); score is the fused score.
        `vector_weight` overrides the settings' weight of the vector arm (convex fusion)."""
        n = max(k, self.settings.fusion_candidates)
        by_vector = self.search_vector(vector, n, where)
        by_text = self.search_text(text, n, where)
        if self.settings.fusion == "rrf":
            return fuse_rrf([by_vector, by_text], k, self.settings.rrf_k)
        w = self.settings.vector_weight if vector_weight is None else vector_weight
        return fuse_convex([(by_vector, w), (by_text, 1.0 - w)], k)

    def search_mentioning(
        self, name: str, vector: np.ndarray, k: int = 10, where: str | None = None
    ) -> list[SearchHit]:
        """Chunks that name `name` as a whole (case-insensitive; `sentences.mentions`), nearest
        to `vector` first. A scan of the text column (a literal LIKE, then the word check):
        meant for the one or two exact names of a question, ~20 ms per 5,600 chunks here.

        The search is exhaustive over the matching rows, for exactness: an IVF index probes a
        few partitions only, and could miss the one chunk of a large store that names a rare
        identifier."""
        if not name:
            return []
        condition = f"lower(text) LIKE {like_pattern(name)} ESCAPE '\\'"
        if where:  # on its own line: a filter ending in an SQL `--` comment stays closed
            condition = f"({check_where(where)}\n) AND {condition}"
        query = (
            self.table.search(np.asarray(vector, dtype=np.float32), vector_column_name="vector")
            .distance_type("cosine")
            .bypass_vector_index()
            .where(condition, prefilter=True)
            .select([*_HIT_COLUMNS, "_distance"])
            .limit(max(64, 4 * k))  # a LIKE match may be a longer name (`pack.windowMemory`)
        )
        rows = [r for r in query.to_arrow().to_pylist() if mentions(r["text"], name)]
        return [_hit(r, 1.0 - float(r["_distance"])) for r in rows[:k]]

    def existing_chunk_ids(self, chunk_ids: Sequence[str], batch: int = 1000) -> set[str]:
        """Which of `chunk_ids` the table holds."""
        found: set[str] = set()
        for i in range(0, len(chunk_ids), batch):
            query = self.table.search().where(in_list("chunk_id", chunk_ids[i : i + batch]))
            found.update(query.select(["chunk_id"]).limit(None).to_arrow()["chunk_id"].to_pylist())
        return found

    def token_ids(self, chunk_ids: Sequence[str], tokenizer_id: str) -> dict[str, list[int]]:
        """Stored token ids of `chunk_ids` made by `tokenizer_id`; chunks missing from the result
        must be tokenized by the caller."""
        if not chunk_ids:
            return {}
        where = f"{in_list('chunk_id', chunk_ids)} AND tokenizer_id = {sql_quote(tokenizer_id)}"
        data = self.table.search().where(where).select(["chunk_id", "token_ids"]).limit(None)
        return {r["chunk_id"]: r["token_ids"] for r in data.to_arrow().to_pylist()}


def fuse_rrf(rankings: Sequence[Sequence[SearchHit]], k: int, rrf_k: int = 60) -> list[SearchHit]:
    """Reciprocal rank fusion: sum of 1 / (rrf_k + rank) over the rankings a chunk appears in.
    Ties break on chunk_id so the order is deterministic."""
    scores: dict[str, float] = {}
    hits: dict[str, SearchHit] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            scores[hit.chunk_id] = scores.get(hit.chunk_id, 0.0) + 1.0 / (rrf_k + rank)
            hits.setdefault(hit.chunk_id, hit)
    order = sorted(scores, key=lambda c: (-scores[c], c))[:k]
    return [_with_score(hits[c], scores[c]) for c in order]


def fuse_convex(rankings: Sequence[tuple[Sequence[SearchHit], float]], k: int) -> list[SearchHit]:
    """Weighted sum of each ranking's scores min-max normalised to [0, 1] (a chunk missing from a
    ranking gets 0 there). Ties break on chunk_id so the order is deterministic."""
    scores: dict[str, float] = {}
    hits: dict[str, SearchHit] = {}
    for ranking, weight in rankings:
        if not ranking:
            continue
        lo = min(h.score for h in ranking)
        span = max(h.score for h in ranking) - lo
        for hit in ranking:
            norm = (hit.score - lo) / span if span > 0 else 1.0
            scores[hit.chunk_id] = scores.get(hit.chunk_id, 0.0) + weight * norm
            hits.setdefault(hit.chunk_id, hit)
    order = sorted(scores, key=lambda c: (-scores[c], c))[:k]
    return [_with_score(hits[c], scores[c]) for c in order]


def connect(db: StoreLocation) -> Any:
    """A LanceDB connection to a folder or an object-store URI. Raises StoreError when the
    store cannot be reached (an object store's bucket missing, no credentials)."""
    import lancedb

    try:
        return lancedb.connect(str(db))
    except Exception as exc:  # lancedb raises bare ValueError/OSError for these
        raise StoreError(f"cannot open the store at {db}: {exc}") from exc


def open_store(
    db_dir: StoreLocation,
    settings: StoreSettings = StoreSettings(),
    *,
    dim: int | None = None,
    embedder_id: str | None = None,
) -> ChunkStore:
    """Open the chunk table, creating it when `dim` is given and it does not exist yet.

    `db_dir` is a local folder or an object-store URI (`ragcache.store_location`). Raises
    SchemaMismatchError when the table was made by another schema version or embedder (nothing
    is changed on disk), StoreError when it is missing and cannot be created.
    """
    import lancedb

    try:
        db_dir = normalise(db_dir)
    except ValueError as exc:
        raise StoreError(str(exc), hint="pass --db a folder or an s3://, gs://, az:// URI") from exc
    if isinstance(db_dir, Path) and db_dir.exists() and not db_dir.is_dir():
        raise StoreError(f"{db_dir} is a file, not a LanceDB folder", hint="pass --db a folder")
    try:
        db = lancedb.connect(str(db_dir))
        table = _open_existing(db, settings.table)
        if table is not None:
            pass
        elif dim is None or embedder_id is None:
            raise StoreError(
                f"no table {settings.table!r} in {db_dir}", hint="run `ragcache ingest` first"
            )
        else:
            table = db.create_table(settings.table, schema=chunk_schema(dim, embedder_id))
    except RagcacheError:
        raise
    except Exception as exc:  # lancedb raises bare OSError/ValueError/RuntimeError here
        raise StoreError(f"cannot open the store at {db_dir}: {exc}") from exc
    _check_schema(table.schema, db_dir, settings.table, embedder_id)
    return ChunkStore(table, settings, db)


def _open_existing(db: Any, name: str) -> Any:
    try:
        return db.open_table(name)
    except ValueError as exc:  # lancedb's "Table 'x' was not found"
        if "not found" in str(exc):
            return None
        raise


def _check_schema(
    schema: pa.Schema, db_dir: StoreLocation, name: str, embedder_id: str | None
) -> None:
    meta = schema.metadata or {}
    version = meta.get(_META_VERSION, b"").decode() or "none"
    hint = "ingest into a new --db folder or --table name; the existing table was left as it is"
    if version != SCHEMA_VERSION:
        raise SchemaMismatchError(
            f"table {name!r} in {db_dir} has schema version {version}; this ragcache writes "
            f"version {SCHEMA_VERSION}",
            hint=hint,
        )
    expected = chunk_schema(schema.field("vector").type.list_size, "")
    if not schema.remove_metadata().equals(expected.remove_metadata()):
        raise SchemaMismatchError(
            f"table {name!r} in {db_dir} claims schema version {version} but its columns differ",
            hint=hint,
        )
    stored = meta.get(_META_EMBEDDER, b"").decode()
    if embedder_id is not None and stored != embedder_id:
        raise SchemaMismatchError(
            f"table {name!r} in {db_dir} holds vectors of embedder {stored}, not {embedder_id}",
            hint=hint,
        )


def _sub_vectors(dim: int) -> int:
    # PQ needs dim divisible by the sub-vector count; 8 dims per sub-vector is LanceDB's advice.
    for n in (dim // 8, dim // 4, dim // 2, 1):
        if n and dim % n == 0:
            return n
    return 1


def _hit(row: dict[str, Any], score: float) -> SearchHit:
    return SearchHit(
        chunk_id=row["chunk_id"],
        doc_id=row["doc_id"],
        source=row["source"] or "",
        title=row["title"] or "",
        heading_path=tuple(row["heading_path"] or ()),
        position=int(row["position"]),
        text=row["text"] or "",
        n_tokens=int(row["n_tokens"]),
        token_ids=tuple(row["token_ids"] or ()),
        tokenizer_id=row["tokenizer_id"] or "",
        score=score,
    )


def _with_score(hit: SearchHit, score: float) -> SearchHit:
    from dataclasses import replace

    return replace(hit, score=score)
