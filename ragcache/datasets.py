"""The bundled datasets: a corpus folder to ingest and a labelled question set to evaluate on.

`python_docs` (see datasets/README.md): Python 3.11 documentation sources, PSF License, with 171
FAQ questions whose gold document holds the answer passage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ragcache.errors import RagcacheError


class DatasetNotFoundError(RagcacheError):
    """A bundled dataset is missing or incomplete."""

    exit_code = 2
    http_status = 404


@dataclass(frozen=True)
class LabelledQuestion:
    id: str
    question: str
    gold_doc_id: str  # the doc id `ragcache ingest <corpus_dir>` gives the answer's document
    answer: str  # a short gold answer: the first sentence or two of the gold passage
    section: str  # where the question sat in the FAQ


@dataclass(frozen=True)
class Dataset:
    name: str
    corpus_dir: Path  # ingest this folder as a whole: doc ids start with its name
    questions: tuple[LabelledQuestion, ...]


def datasets_dir() -> Path:
    """The repository's datasets/ folder."""
    return Path(__file__).resolve().parent.parent / "datasets"


def load_dataset(name: str = "python_docs", root: Path | None = None) -> Dataset:
    """Load a bundled dataset. Raises DatasetNotFoundError when its files are missing."""
    root = root or datasets_dir()
    corpus = root / name
    questions_path = root / f"{name}_questions.jsonl"
    if not corpus.is_dir() or not questions_path.exists():
        raise DatasetNotFoundError(
            f"dataset {name!r} not found under {root}",
            hint=f"regenerate it: python datasets/build_{name}.py",
        )
    questions = tuple(
        LabelledQuestion(**json.loads(line))
        for line in questions_path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    )
    return Dataset(name=name, corpus_dir=corpus, questions=questions)
