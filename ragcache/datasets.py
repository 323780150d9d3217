"""The bundled datasets: a corpus folder to ingest and a labelled question set to evaluate on.

`python_docs` (see datasets/README.md): Python 3.11 documentation sources, PSF License, with 171
FAQ questions whose gold document holds the answer passage.
`git_docs`: Git 2.39's manual pages, GPL-2.0, with 199 questions whose gold answer is short (a
command, an option, a default value) and whose `evidence` is the gold page's sentence stating it.
`unanswerable_questions.jsonl`: questions that one of those corpora does not answer, for checking
that an answerer says so instead of inventing an answer.
`python_docs_topic_questions.jsonl`: questions about a few pages of the Python tutorial and HOWTOs,
several per page, as people ask about one document (the chunk-reuse workload).
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
    answer: str  # a short gold answer (python_docs: the first sentence or two of the gold passage)
    section: str  # where the question sat in the FAQ, or its kind (git_docs: command, option, ...)
    aliases: tuple[str, ...] = ()  # other acceptable forms of `answer` ("git-bisect", "bisect")
    evidence: str = ""  # a sentence of the gold document, verbatim, that states the answer


@dataclass(frozen=True)
class UnanswerableQuestion:
    id: str
    question: str
    store: str  # the dataset (corpus) that does not hold the answer: "git_docs" or "python_docs"
    section: str  # what kind of near miss it is


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
        _labelled(json.loads(line))
        for line in questions_path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    )
    return Dataset(name=name, corpus_dir=corpus, questions=questions)


def load_unanswerable(root: Path | None = None) -> tuple[UnanswerableQuestion, ...]:
    """Load the questions whose answer is not in their named store (unanswerable_questions.jsonl).
    Raises DatasetNotFoundError when the file is missing."""
    rows = _hand_written_rows((root or datasets_dir()) / "unanswerable_questions.jsonl")
    return tuple(UnanswerableQuestion(**row) for row in rows)


def load_topic_questions(root: Path | None = None) -> tuple[LabelledQuestion, ...]:
    """Load the questions asked about single pages of `python_docs` (each question's `section`
    is its page's topic, `gold_doc_id` the page). Raises DatasetNotFoundError when missing."""
    rows = _hand_written_rows((root or datasets_dir()) / "python_docs_topic_questions.jsonl")
    return tuple(_labelled(row) for row in rows)


def _hand_written_rows(path: Path) -> list[dict]:
    """The rows of a hand-written JSONL file (no script rebuilds it, so a missing one must be
    restored from the repository)."""
    if not path.exists():
        raise DatasetNotFoundError(
            f"{path.name} not found under {path.parent}",
            hint="it is written by hand: restore it from the repository",
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _labelled(row: dict) -> LabelledQuestion:
    """One question-file line as a LabelledQuestion: `aliases` comes as a JSON list, or not at
    all (python_docs), and becomes a tuple."""
    return LabelledQuestion(**{**row, "aliases": tuple(row.get("aliases", ()))})
