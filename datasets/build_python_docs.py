"""Regenerate the bundled `python_docs` corpus and its labelled question set.

Source: the reStructuredText sources of Python 3.11's documentation as Debian ships them
(`apt-get install python3.11-doc`, under /usr/share/doc/python3.11/html/_sources). License: PSF
License Agreement (the corpus keeps `license.rst`, which carries it).

The FAQ pages become the labelled set: every FAQ section titled by a question becomes one corpus
document holding only its answer (the question heading is removed, so retrieval has to match the
meaning, not copy the title), and one line of `python_docs_questions.jsonl` with the question, the
gold document id and a short gold answer (the answer's first sentence or two). The other chosen
parts of the documentation are copied as they are, as distractors.

Usage: python datasets/build_python_docs.py [--src DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import ragcache  # noqa: F401
from ingest.formats.rst import clean_inline, find_headings

SOURCE = Path("/usr/share/doc/python3.11/html/_sources")
# Parts copied whole (about 2 MB together). The library reference (7 MB) is left out to keep the
# repository small and a full ingest of the corpus near a minute and a half on two CPU cores.
PARTS = ("tutorial", "howto", "reference", "extending", "using", "installing", "distributing")
SINGLE_FILES = ("glossary.rst.txt", "license.rst.txt")
MIN_ANSWER_CHARS = 80


def build(src: Path, out: Path) -> None:
    corpus = out / "python_docs"
    if corpus.exists():
        shutil.rmtree(corpus)
    corpus.mkdir(parents=True)
    for part in PARTS:
        for f in sorted((src / part).rglob("*.rst.txt")):
            _copy(f, corpus / f.relative_to(src))
    for name in SINGLE_FILES:
        _copy(src / name, corpus / name)
    questions = []
    for page in sorted((src / "faq").glob("*.rst.txt")):
        questions += _split_faq(page, corpus)
    with open(out / "python_docs_questions.jsonl", "w") as f:
        for q in questions:
            f.write(json.dumps(q, ensure_ascii=False) + "\n")
    n_files = sum(1 for _ in corpus.rglob("*.rst"))
    size = sum(p.stat().st_size for p in corpus.rglob("*.rst"))
    print(f"{n_files} files ({size / 1e6:.2f} MB), {len(questions)} questions")


def _copy(f: Path, target: Path) -> None:
    target = target.with_name(target.name.removesuffix(".txt"))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f.read_text(encoding="utf-8"), encoding="utf-8")


def _split_faq(page: Path, corpus: Path) -> list[dict]:
    name = page.name.removesuffix(".rst.txt")
    lines = page.read_text(encoding="utf-8").splitlines()
    headings = find_headings(lines)
    out = []
    path: list[tuple[int, str]] = []
    for i, h in enumerate(headings):
        while path and path[-1][0] >= h.level:
            path.pop()
        path.append((h.level, clean_inline(h.title)))
        end = headings[i + 1].line if i + 1 < len(headings) else len(lines)
        body = lines[h.line + h.n_lines : end]
        # A label line (".. _name:") just before the next heading belongs to that heading.
        while body and (not body[-1].strip() or body[-1].startswith(".. _")):
            body.pop()
        text = "\n".join(body).strip()
        if not h.title.rstrip().endswith("?") or len(text) < MIN_ANSWER_CHARS:
            continue
        number = len(out) + 1
        rel = Path("faq") / name / f"q{number:03d}.rst"
        (corpus / rel).parent.mkdir(parents=True, exist_ok=True)
        (corpus / rel).write_text(text + "\n", encoding="utf-8")
        out.append(
            {
                "id": f"faq-{name}-{number:03d}",
                "question": " ".join(clean_inline(h.title).split()),
                "gold_doc_id": f"python_docs/{rel.as_posix()}",
                "answer": _short_answer(text),
                "section": " > ".join(t for _, t in path[:-1]),
            }
        )
    return out


def _short_answer(rst_text: str) -> str:
    """The first sentence or two of the answer's prose, markup removed, at most ~300 characters."""
    prose: list[str] = []
    intros: list[str] = []
    for para in re.split(r"\n\s*\n", rst_text):
        if para.startswith((" ", "\t", "..", ">>>")):
            continue  # code, examples and directives: not a short answer
        para = " ".join(clean_inline(re.sub(r"\s*::$", ":", para.rstrip())).split())
        if para.endswith(":"):
            intros.append(para)  # "results like this:" introduces an example, not an answer
            continue
        prose.append(para)
        if sum(len(p) for p in prose) >= 40:
            break
    text = " ".join(prose) or " ".join(intros) or " ".join(clean_inline(rst_text).split())
    sentences = re.split(r"(?<=[.!?])\s+", text)
    answer = sentences[0]
    for s in sentences[1:]:
        if len(answer) >= 40 or len(answer) + len(s) > 300:
            break
        answer += " " + s
    return answer[:300]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=SOURCE)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    build(args.src, args.out)


if __name__ == "__main__":
    main()
