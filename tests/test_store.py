"""The chunk store against real LanceDB tables in tmp_path (random unit vectors, no embedder)."""

from __future__ import annotations

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from ingest.chunker import Chunk
from ingest.documents import Document, Section
from ingest.rows import build_rows, chunk_ids
from ragcache.errors import InvalidRequestError
from ragcache.store import (
    ChunkStore,
    SchemaMismatchError,
    SearchHit,
    StoreSettings,
    check_where,
    chunk_schema,
    fuse_convex,
    fuse_rrf,
    like_pattern,
    open_store,
)

DIM = 16
EMB = "test-embedder"


def _doc(doc_id: str, texts: list[str], rng: np.random.Generator, version: str = "v1"):
    chunks = [Chunk(t, tuple(range(len(t.split()))), ("H",), 0, 0, len(t)) for t in texts]
    doc = Document(doc_id, f"/src/{doc_id}", doc_id.upper(), (Section((), " ".join(texts)),), "fp")
    vectors = rng.standard_normal((len(texts), DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return (doc, version, chunks, chunk_ids(doc_id, chunks)), vectors


def _write(store, docs_and_vectors):
    docs = [d for d, _ in docs_and_vectors]
    vectors = np.concatenate([v for _, v in docs_and_vectors])
    store.replace_docs(
        build_rows(docs, vectors, "tok1", store.table.schema), [d[0].doc_id for d in docs]
    )


@pytest.fixture
def store(tmp_path):
    return open_store(tmp_path / "db", dim=DIM, embedder_id=EMB)


def test_replace_docs_swaps_a_documents_chunks_in_one_commit(store):
    rng = np.random.default_rng(0)
    a, b = _doc("a", ["alpha one", "alpha two", "alpha three"], rng), _doc("b", ["beta"], rng)
    _write(store, [a, b])
    version = store.table.version
    a2 = _doc("a", ["alpha one", "alpha changed"], rng, "v2")
    _write(store, [a2])
    assert store.table.version == version + 1  # one atomic commit
    states = store.doc_states()
    assert set(states["a"].chunk_ids) == set(a2[0][3])
    assert states["a"].is_complete("v2") and states["b"].is_complete("v1")
    assert a[0][3][0] in states["a"].chunk_ids  # the unchanged chunk kept its id
    assert store.count() == 3


def test_delete_docs_and_existing_ids(store):
    rng = np.random.default_rng(1)
    a, b = _doc("a", ["x y", "z w"], rng), _doc("b", ["q"], rng)
    _write(store, [a, b])
    store.delete_docs(["a"])
    assert set(store.doc_states()) == {"b"}
    assert store.existing_chunk_ids([*a[0][3], *b[0][3]]) == set(b[0][3])


def test_reopen_checks_schema_version_and_leaves_other_tables_alone(tmp_path):
    db = lancedb.connect(str(tmp_path / "db"))
    old = chunk_schema(DIM, EMB).with_metadata({b"ragcache.schema_version": b"0"})
    table = db.create_table("chunks", schema=old)
    with pytest.raises(SchemaMismatchError, match="schema version 0"):
        open_store(tmp_path / "db", dim=DIM, embedder_id=EMB)
    foreign = db.create_table("other", schema=pa.schema([("x", pa.int64())]))
    foreign.add(pa.table({"x": [1, 2]}))
    with pytest.raises(SchemaMismatchError, match="schema version none"):
        open_store(tmp_path / "db", StoreSettings(table="other"), dim=DIM, embedder_id=EMB)
    assert table.version == db.open_table("chunks").version and foreign.count_rows() == 2


def test_another_embedder_is_refused(tmp_path):
    open_store(tmp_path / "db", dim=DIM, embedder_id=EMB)
    with pytest.raises(SchemaMismatchError, match="holds vectors of embedder"):
        open_store(tmp_path / "db", dim=DIM, embedder_id="other")
    assert open_store(tmp_path / "db").embedder_id == EMB  # readers need not name it


def test_vector_text_and_hybrid_search_with_filter(store):
    rng = np.random.default_rng(2)
    texts = ["the radix tree caches prefixes", "lancedb stores vectors", "bm25 ranks words"]
    docs = [_doc(f"d{i}", [t], rng) for i, t in enumerate(texts)]
    _write(store, docs)
    store.maintain(compact=False)
    target = docs[1][1][0]
    by_vector = store.search_vector(target, k=3)
    assert by_vector[0].doc_id == "d1" and by_vector[0].score == pytest.approx(1.0, abs=1e-5)
    by_text = store.search_text("radix prefixes", k=3)
    assert [h.doc_id for h in by_text][:1] == ["d0"]
    hybrid = store.search_hybrid("radix prefixes", target, k=3)
    assert {h.doc_id for h in hybrid[:2]} == {"d0", "d1"}
    filtered = store.search_hybrid("radix prefixes", target, k=3, where="doc_id = 'd2'")
    assert [h.doc_id for h in filtered] == ["d2"]
    hit = by_vector[0]
    assert hit.heading_path == ("H",) and hit.tokenizer_id == "tok1" and hit.token_ids == (0, 1, 2)
    assert store.token_ids([hit.chunk_id], "tok1") == {hit.chunk_id: [0, 1, 2]}
    assert store.token_ids([hit.chunk_id], "another-tokenizer") == {}


def test_hybrid_vector_weight_moves_the_fusion_between_its_arms(store):
    """A caller's weight overrides the settings': the retriever leans on the exact words for a
    question that names an identifier."""
    rng = np.random.default_rng(2)
    texts = ["the radix tree caches prefixes", "lancedb stores vectors", "bm25 ranks words"]
    docs = [_doc(f"d{i}", [t], rng) for i, t in enumerate(texts)]
    _write(store, docs)
    store.maintain(compact=False)
    target = docs[1][1][0]  # the vector arm's best is d1, the text arm's d0
    assert store.search_hybrid("radix prefixes", target, k=3, vector_weight=0.9)[0].doc_id == "d1"
    assert store.search_hybrid("radix prefixes", target, k=3, vector_weight=0.1)[0].doc_id == "d0"


def test_fts_query_words_are_not_query_syntax(store):
    rng = np.random.default_rng(3)
    _write(store, [_doc("a", ["what's a (tuple)? AND OR NOT"], rng)])
    store.maintain(compact=False)
    assert [h.doc_id for h in store.search_text('what\'s "a" (tuple)? AND -x', k=2)] == ["a"]
    assert store.search_text("   ", k=2) == []


def test_maintain_builds_indexes_once_large_enough(tmp_path):
    settings = StoreSettings(vector_index_min_rows=300)
    store = open_store(tmp_path / "db", settings, dim=DIM, embedder_id=EMB)
    rng = np.random.default_rng(4)
    docs = [_doc(f"d{i}", [f"text number {i} about topic {i % 7}"], rng) for i in range(200)]
    _write(store, docs)
    assert store.maintain(compact=False) == ["built full-text index"]
    _write(store, [_doc(f"e{i}", [f"more text {i}"], rng) for i in range(200)])
    done = store.maintain(compact=True)
    assert any("IVF-PQ" in d for d in done) and any("compacted" in d for d in done)
    kinds = {i.index_type for i in store.table.list_indices()}
    assert {"FTS", "IvfPq"} <= kinds
    target = docs[5][1][0]
    assert store.search_vector(target, k=1)[0].doc_id == "d5"  # refine_factor keeps it exact here
    assert store.search_text("topic", k=500)  # new rows are searchable after compaction
    # A name is found in an indexed table (exhaustively over the matching rows), as a whole
    # name and in any case; a longer name that starts with it does not count.
    _write(store, [_doc("named", ["the Frob_Limit entry"], rng)])
    _write(store, [_doc("longer", ["the frob_limitMore entry, frob-limit"], rng)])
    store.maintain(compact=True)  # the new rows go into the index's partitions too
    far = -docs[5][1][0]
    for name in ("frob_limit", "FROB_LIMIT"):
        assert [h.doc_id for h in store.search_mentioning(name, far, k=5)] == ["named"]
    assert store.search_mentioning("frob_limit", far, k=5, where="doc_id = 'd1' -- note") == []
    assert store.search_mentioning("frob_lim", far, k=5) == []


def test_like_patterns_take_wildcards_literally(store: ChunkStore) -> None:
    rng = np.random.default_rng(5)
    _write(
        store, [_doc(f"d{i}", [t], rng) for i, t in enumerate(["axb", "a_b", "50% off", "c:\\x"])]
    )

    def where(text: str) -> list[str]:
        condition = f"lower(text) LIKE {like_pattern(text)} ESCAPE '\\'"
        rows = store.table.search().where(condition).select(["doc_id"]).limit(None)
        return sorted(rows.to_arrow()["doc_id"].to_pylist())

    assert where("a_b") == ["d1"]  # unescaped, `_` would match "axb" too
    assert where("50%") == ["d2"] and where("0% o") == ["d2"] and where("%") == ["d2"]
    assert where("c:\\x") == ["d3"] and where("it's") == []


def test_rrf_fusion_is_deterministic_and_rewards_agreement():
    def hit(cid: str) -> SearchHit:
        return SearchHit(cid, "d", "", "", (), 0, cid, 1, (), "", 0.0)

    a = [hit("x"), hit("y"), hit("z")]
    b = [hit("y"), hit("w")]
    fused = fuse_rrf([a, b], k=4)
    assert [h.chunk_id for h in fused] == ["y", "x", "w", "z"]
    assert fused[0].score == pytest.approx(1 / 62 + 1 / 61)
    assert [h.chunk_id for h in fuse_rrf([[hit("q")], [hit("p")]], k=2)] == ["p", "q"]  # tie: by id


def test_convex_fusion_weights_normalised_scores():
    def hit(cid: str, score: float) -> SearchHit:
        return SearchHit(cid, "d", "", "", (), 0, cid, 1, (), "", score)

    vector = [hit("a", 0.9), hit("b", 0.5), hit("c", 0.1)]
    text = [hit("c", 12.0), hit("b", 2.0)]
    fused = fuse_convex([(vector, 0.6), (text, 0.4)], k=3)
    assert [h.chunk_id for h in fused] == ["a", "c", "b"]
    assert [h.score for h in fused] == pytest.approx([0.6, 0.4, 0.3])
    assert fuse_convex([([], 0.5), ([hit("x", 3.0)], 0.5)], k=1)[0].score == 0.5


@pytest.mark.parametrize(
    "where", ["doc_id = 'a'; DELETE FROM chunks", "position > 1 ;position < 0", "a = 1;"]
)
def test_a_where_with_a_second_statement_is_refused(store: ChunkStore, where: str) -> None:
    # LanceDB would filter on the text before the ';' and silently drop the rest.
    with pytest.raises(InvalidRequestError, match="second statement"):
        store.search_vector(np.ones(DIM, dtype=np.float32), 3, where)


def test_a_semicolon_inside_quotes_is_text(store: ChunkStore) -> None:
    assert check_where("title = 'a;b' OR \"doc_id\" = 'it''s; fine'")
    store.search_vector(np.ones(DIM, dtype=np.float32), 3, "title = 'a;b'")
