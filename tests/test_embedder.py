"""The bundled sentence-transformers embedder, loaded from its package offline."""

from __future__ import annotations

import threading

import numpy as np

from ragcache.embedder import (
    SentenceTransformerEmbedder,
    _openblas,
    openblas_threads,
    single_threaded_openblas,
)
from tests.ingest_support import embedder


def test_vectors_are_unit_length_and_meaningful():
    emb = embedder()
    vectors = emb.embed(["How do I copy a list?", "Copying lists in Python", "Volcanic rock"])
    assert vectors.shape == (3, emb.dim) == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
    assert np.allclose(emb.embed_query("How do I copy a list?"), vectors[0], atol=1e-5)
    assert emb.embed([]).shape == (0, 384)


def test_identity_is_stable_and_needs_no_model_load():
    fresh = SentenceTransformerEmbedder()
    assert fresh.identity == embedder().identity and fresh.dim == 384
    assert fresh._model is None


def test_openblas_threads_are_restored_after_embedding():
    lib = _openblas()
    before = lib.openblas_get_num_threads() if lib is not None else None
    embedder().embed(["restore the thread count"])
    assert (lib.openblas_get_num_threads() if lib is not None else None) == before


def test_overlapping_embeddings_from_many_threads_restore_openblas_once() -> None:
    # The query path embeds on up to `prepare_threads` threads at once; a per-call save and
    # restore could leave MLX's OpenBLAS at one thread for good.
    before = openblas_threads()
    emb = embedder()
    seen_inside: list[int | None] = []
    start = threading.Barrier(4)

    def work(i: int) -> None:
        start.wait()
        for j in range(3):
            with single_threaded_openblas():
                seen_inside.append(openblas_threads())
                emb.embed([f"question {i} {j}"])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert openblas_threads() == before
    if before is not None:
        assert set(seen_inside) == {1}
