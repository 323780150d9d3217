"""Shared helpers of the ingest and store tests: the real tokenizer and embedder, loaded once per
process, and small real input files (a PDF written by hand, corpora of Markdown files)."""

from __future__ import annotations

import functools
from pathlib import Path

import ragcache  # noqa: F401  (BLAS before mlx, as everywhere)
from ingest.tokens import GeneratorTokens, load_tokens, tokenizer_folder
from ragcache.embedder import SentenceTransformerEmbedder
from ragcache.settings import load_settings

GENERATOR = "smollm2-135m-instruct"


@functools.cache
def generator_tokens() -> GeneratorTokens:
    return load_tokens(tokenizer_folder(GENERATOR, load_settings().home))


@functools.cache
def embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder()


def minimal_pdf(pages: list[str]) -> bytes:
    """A valid PDF with one line of Helvetica text per page (byte offsets computed, not guessed)."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages)))
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode())
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for i, text in enumerate(pages):
        content = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {5 + 2 * i} 0 R "
            "/Resources << /Font << /F1 3 0 R >> >> >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


TOPICS = [
    ("Caching", "A cache keeps results so that repeated work is avoided."),
    ("Vectors", "Embeddings map text to vectors so that similar meanings lie close together."),
    ("Storage", "LanceDB stores tables in the Lance columnar format on local disk."),
    ("Search", "Full-text search ranks documents by BM25 over their words."),
]


def write_markdown_corpus(folder: Path, n_docs: int, paragraphs: int = 3) -> list[Path]:
    """`n_docs` Markdown files with headings and distinct paragraphs; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for d in range(n_docs):
        title, sentence = TOPICS[d % len(TOPICS)]
        parts = [f"# {title} note {d}\n"]
        for p in range(paragraphs):
            parts.append(f"## Part {p}\n\n{sentence} Document {d}, paragraph {p}. " * 3 + "\n")
        path = folder / f"doc{d:03d}.md"
        path.write_text("\n".join(parts), encoding="utf-8")
        paths.append(path)
    return paths
