"""Ingest on Ray Data: the same job, with its two costly steps spread over a cluster.

The driver keeps everything that makes a job safe to kill and rerun, exactly as the local engine
does (`ingest.pipeline`): the plan (documents stored at their current version are not read), the
store lease, the removal journal, one `replace_docs` commit per batch of whole documents, and
`--sync`. Ray Data runs what costs: reading, parsing and chunking files (tasks, the same
`file_items` as the local producer thread) and embedding (an actor pool as large as the
cluster's CPUs, one embedder per actor), streaming each document back to the driver as soon as
its vectors exist. So a killed job leaves whole documents or none, as locally, and the table it
writes is the local engine's (same chunk ids and token ids; vectors equal to float tolerance).

Every node needs the generator's tokenizer under the same `RAGCACHE_HOME` (the driver's path is
sent to the tasks) and the files under the same paths: a shared file system, as Ray Data's own
file readers assume.
"""

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ingest.chunker import Tokens
from ingest.formats import FileRef
from ingest.producer import END, DocWork, file_items
from ingest.settings import IngestSettings
from ingest.tokens import load_tokens
from ragcache.embedder import EmbedderSettings, SentenceTransformerEmbedder
from ragcache.ray_cluster import connect
from ragcache.store import DocState

FILES_PER_TASK = 8  # files read and chunked per Ray task
DOCS_PER_EMBED = 16  # documents whose chunks one actor embeds in one call


class RayDocumentSource:
    """The local DocumentProducer's interface (`todo`, `start`, `drain`, `stop`) over a Ray Data
    stream: the items come from Ray tasks and actors, each "doc" item with its vectors."""

    def __init__(
        self,
        todo: list[FileRef],
        states: dict[str, DocState],
        pipeline_id: str,
        settings: IngestSettings,
        tokens: Path | Tokens,
        embedder_settings: EmbedderSettings,
        address: str | None = None,
    ) -> None:
        self.todo = todo
        self.stop = threading.Event()
        self._args = (states, pipeline_id, settings, tokens)
        self._embedder_settings = embedder_settings
        self._address = address
        self._ray: Any = None

    def start(self) -> None:
        """Connect now, before any work: a wrong address fails the job before it writes."""
        if self.todo:  # nothing to read: no cluster needed (an incremental rerun)
            self._ray = connect(self._address)

    def drain(self) -> Iterator[object]:
        if not self.todo:
            yield END
            return
        ray = self._ray
        from ray.data import ActorPoolStrategy, DataContext

        context = DataContext.get_current()
        context.enable_progress_bars = False  # the job's own progress bar speaks for it
        context.enable_operator_progress_bars = False
        context.print_on_execution_start = False

        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        groups = [
            self.todo[i : i + FILES_PER_TASK] for i in range(0, len(self.todo), FILES_PER_TASK)
        ]
        load = _Loader(*self._args)
        ds = (
            ray.data.from_items([{"files": pickle.dumps(g)} for g in groups])
            .flat_map(load, num_cpus=0.25)
            .map_batches(
                _Embedder,
                fn_constructor_kwargs={"settings": self._embedder_settings},
                batch_size=DOCS_PER_EMBED,
                batch_format="numpy",
                compute=ActorPoolStrategy(min_size=1, max_size=cpus),
                num_cpus=1,
            )
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for blob in batch["item"]:
                if self.stop.is_set():
                    return
                yield pickle.loads(blob)
        yield END


class _Loader:
    """A Ray task's work: read, parse and chunk a group of files, as the local producer does."""

    def __init__(
        self,
        states: dict[str, DocState],
        pipeline_id: str,
        settings: IngestSettings,
        tokens: Path | Tokens,
    ) -> None:
        self.states, self.pipeline_id, self.settings = states, pipeline_id, settings
        # A folder is loaded in the task, once; a Tokens object (tests, library users) is sent.
        self._folder = tokens if isinstance(tokens, Path) else None
        self._tokens: Tokens | None = None if isinstance(tokens, Path) else tokens

    def tokens(self) -> Tokens:
        if self._tokens is None:
            assert self._folder is not None
            self._tokens = load_tokens(self._folder)
        return self._tokens

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for ref in pickle.loads(row["files"]):
            for item in file_items(ref, self.states, self.pipeline_id, self.settings, self.tokens):
                out.append({"item": pickle.dumps(item)})
            out.append({"item": pickle.dumps(("file", ref.doc_id))})
        return out


class _Embedder:
    """A pool actor: one embedder, loaded once; gives each document its chunks' vectors."""

    def __init__(self, settings: EmbedderSettings) -> None:
        import torch

        # Ray gives each actor one CPU: one torch thread each, so the pool fills the cluster.
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.embedder = SentenceTransformerEmbedder(settings)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [pickle.loads(b) for b in batch["item"]]
        works: list[DocWork] = [p for k, p in items if k == "doc"]
        texts = [c.text for w in works for c in w.chunks]
        vectors = (
            self.embedder.embed(texts)
            if texts
            else np.zeros((0, self.embedder.dim), dtype=np.float32)
        )
        at = 0
        for w in works:
            w.vectors = vectors[at : at + len(w.chunks)]
            at += len(w.chunks)
        return {"item": np.array([pickle.dumps(i) for i in items], dtype=object)}


def ray_source_factory(
    tokens: Path | Tokens, embedder_settings: EmbedderSettings, address: str | None
) -> Callable[..., RayDocumentSource]:
    """A producer factory with the local DocumentProducer's signature, for `run_job`."""

    def make(
        todo: list[FileRef],
        states: dict[str, DocState],
        pipeline_id: str,
        settings: IngestSettings,
        get_tokens: Callable[[], Tokens],
    ) -> RayDocumentSource:
        del get_tokens  # the tasks load the tokenizer themselves (or get it sent)
        return RayDocumentSource(
            todo, states, pipeline_id, settings, tokens, embedder_settings, address
        )

    return make
