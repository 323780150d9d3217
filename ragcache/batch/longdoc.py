"""Long-context mode: the given documents form one prefix shared by every question.

The prompt is `[instructions][doc piece]...[doc piece][question]`. Documents are tokenized once,
each on its own, and cut into pieces of `segment_tokens`; every piece boundary is a capture
position, so the cache holds checkpoints all along the document and a model with sliding-window
layers (Gemma 3's 512 tokens) can restore the whole prefix for each later question. Cutting token
ids (not text) keeps the ids exactly those of the whole document.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ragcache.batch.formats import BatchRequest, Citation
from ragcache.batch.modes import Answer, Prepared, sampling_for
from ragcache.engine import Completion
from ragcache.errors import InvalidRequestError, PromptTooLongError
from ragcache.model_loader import LoadedModel
from ragcache.rag_prompt import chat_frame
from ragcache.sampling import SamplingParams
from ragcache.segments import SegmentedPrompt, encode_segments

_CITATION = re.compile(r"\[(\d{1,2})\]")
INSTRUCTIONS = (
    "Answer the question using only the numbered documents below. Be brief. Cite a document's "
    "number in brackets, like [1]. If the documents do not answer the question, say you do not know."
)


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass(frozen=True)
class LongContextSettings:
    # Piece size: a checkpoint at least this often, and one sliding window (512) or more per piece
    # so a checkpoint never costs more than the tokens it saves.
    segment_tokens: int = 768
    instructions: str = INSTRUCTIONS


def read_documents(paths: Sequence[Path]) -> list[Document]:
    """Read UTF-8 text files. Raises InvalidRequestError for a missing, unreadable or empty file."""
    docs = []
    for path in paths:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise InvalidRequestError(
                f"cannot read document {path}: {exc.strerror or exc}",
                hint="pass text files with --doc",
            ) from None
        if not text.strip():
            raise InvalidRequestError(f"document {path} is empty")
        docs.append(Document(path.name, text))
    if not docs:
        raise InvalidRequestError("long-context mode needs at least one document")
    return docs


class LongContextMode:
    """Builds prompts over fixed documents; one instance per batch. Raises PromptTooLongError at
    construction when the documents alone leave no room for a question."""

    name = "long_context"

    def __init__(
        self,
        loaded: LoadedModel,
        documents: Sequence[Document],
        settings: LongContextSettings | None = None,
    ) -> None:
        self.loaded = loaded
        self.documents = list(documents)
        self.settings = settings = settings or LongContextSettings()
        tok = loaded.tokenizer
        if loaded.chat:
            glue = chat_frame(tok, ("system", "user")).glue
            head = glue[0] + settings.instructions + glue[1] + "Documents:\n"
            self._question = "\nQuestion: {q}" + glue[2]
        else:
            head = settings.instructions + "\n\nDocuments:\n"
            self._question = "\nQuestion: {q}\nAnswer:"
        segments: list[str | list[int]] = [head]
        kinds = ["system"]
        for i, doc in enumerate(self.documents):
            ids = tok.encode(f"[{i + 1}] {doc.name}\n", add_special_tokens=False)
            ids += tok.encode(doc.text.strip() + "\n", add_special_tokens=False)
            step = max(1, settings.segment_tokens)
            for a in range(0, len(ids), step):
                segments.append(list(ids[a : a + step]))
                kinds.append("document")
        self.prefix = encode_segments(tok, segments, kinds)
        self._check_room()

    @property
    def prefix_tokens(self) -> int:
        return len(self.prefix.tokens)

    def _check_room(self) -> None:
        limit = self.loaded.context_length
        # The shortest possible question still needs its template and one token to answer with.
        need = self.prefix_tokens + len(self._question_ids("?")) + 1
        if need > limit:
            raise PromptTooLongError(
                f"the documents take {self.prefix_tokens} tokens with the instructions, but "
                f"{self.loaded.name} holds {limit}: {need - limit} tokens too many before any "
                "question is asked",
                hint="pass shorter or fewer documents, or a model with a longer context",
            )

    def _question_ids(self, question: str) -> list[int]:
        text = self._question.format(q=question)
        return list(self.loaded.tokenizer.encode(text, add_special_tokens=False))

    def prepare(self, request: BatchRequest, params: SamplingParams) -> Prepared:
        ids = self._question_ids(request.question)
        tokens = [*self.prefix.tokens, *ids]
        limit = self.loaded.context_length
        if len(tokens) >= limit:
            raise PromptTooLongError(
                f"the documents and this question take {len(tokens)} tokens but "
                f"{self.loaded.name} holds {limit} ({len(tokens) - limit + 1} too many)",
                hint="shorten the question",
            )
        prompt = SegmentedPrompt(
            tokens, [*self.prefix.boundaries, len(tokens)], [*self.prefix.kinds, "question"]
        )
        return Prepared(request, prompt, sampling_for(self.loaded.chat, params))

    def refresh(self, prepared: Prepared) -> Prepared:
        return prepared  # the prompt is fixed

    def finish(self, prepared: Prepared, completion: Completion, started: float) -> Answer:
        numbers = dict.fromkeys(int(m.group(1)) for m in _CITATION.finditer(completion.text))
        citations = [
            Citation(n, self.documents[n - 1].name) for n in numbers if 0 < n <= len(self.documents)
        ]
        return Answer(completion.text, citations)
