"""Format loaders on real bytes: headings become paths, markup and page chrome go, bad content is
skipped with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.decode import decode_text
from ingest.documents import SkipFile
from ingest.formats import FileRef, load_documents
from ingest.formats.rst import find_headings
from tests.ingest_support import minimal_pdf


def _load(name: str, data: bytes):
    ref = FileRef(Path(name), name, f"/abs/{name}")
    return load_documents(ref, data, "fp")


def test_markdown_headings_code_fences_and_front_matter():
    md = (
        "---\ntitle: x\n---\n# Guide\n\nIntro.\n\n## Install\n\nRun it.\n\n```sh\n# not a heading\n"
        "```\n\nSetext\n------\n\nUnder setext.\n"
    )
    (doc,) = _load("a.md", md.encode()).documents
    paths = [(s.heading_path, s.text) for s in doc.sections]
    assert paths[0] == (("Guide",), "Intro.")
    assert paths[1][0] == ("Guide", "Install") and "# not a heading" in paths[1][1]
    assert paths[2] == (("Guide", "Setext"), "Under setext.")
    assert doc.title == "Guide" and "title: x" not in doc.sections[0].text


def test_rst_headings_roles_and_directives():
    rst = (
        "=====\nTitle\n=====\n\n.. index:: single: hidden\n   pair: also hidden\n\n"
        "Use :func:`open` and :class:`~io.TextIOWrapper`, see :ref:`the docs <docs>`.\n\n"
        "Section\n-------\n\n.. note::\n\n   Keep ``this`` text.\n\n.. _label:\n\nSub\n^^^\n\nBody.\n"
    )
    lines = rst.splitlines()
    assert [(h.level, h.title) for h in find_headings(lines)] == [
        (1, "Title"),
        (2, "Section"),
        (3, "Sub"),
    ]
    (doc,) = _load("a.rst", rst.encode()).documents
    text = {s.heading_path: s.text for s in doc.sections}
    assert text[("Title",)] == "Use open and TextIOWrapper, see the docs."
    assert "Keep this text." in text[("Title", "Section")] and "hidden" not in str(text)
    assert text[("Title", "Section", "Sub")] == "Body."


def test_html_keeps_main_text_and_headings_not_navigation():
    html = (
        "<html><head><title>Page</title><script>var x=1;</script></head><body>"
        "<nav><a href='/'>Home</a> | <a>Menu</a></nav><main><h1>Caching</h1><p>Keep <b>results</b>."
        "</p><h2>Eviction</h2><ul><li>LRU</li><li>PGDSF</li></ul></main><footer>© 2026</footer>"
        "</body></html>"
    )
    (doc,) = _load("p.html", html.encode()).documents
    assert doc.title == "Page"
    assert [(s.heading_path, s.text) for s in doc.sections] == [
        (("Caching",), "Keep results."),
        (("Caching", "Eviction"), "LRU\n\nPGDSF"),
    ]


def test_pdf_pages_become_sections_and_corrupt_pdf_is_skipped():
    (doc,) = _load("d.pdf", minimal_pdf(["First page", "Second page"])).documents
    assert [(s.heading_path, s.text) for s in doc.sections] == [
        (("page 1",), "First page"),
        (("page 2",), "Second page"),
    ]
    with pytest.raises(SkipFile, match="corrupt PDF"):
        _load("bad.pdf", b"%PDF-1.7\n" + bytes(range(256)) * 4)


def test_jsonl_lines_become_documents_and_bad_lines_are_listed():
    data = b'{"id": 7, "text": "seven", "tag": "a"}\n[1]\n{"text": ""}\n{"text": "line four"}\n'
    loaded = _load("r.jsonl", data)
    assert [(d.doc_id, d.metadata) for d in loaded.documents] == [
        ("r.jsonl#7", {"tag": "a"}),
        ("r.jsonl#4", {}),
    ]
    assert [(s.path, s.reason) for s in loaded.skipped] == [
        ("/abs/r.jsonl:2", "no string field 'text'"),
        ("/abs/r.jsonl:3", "empty 'text'"),
    ]
    with pytest.raises(SkipFile, match="no usable line"):
        _load("bad.jsonl", b"{nope\n")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"  \n\n", "empty file"),
        (b"text\x00with nul", "binary"),
        (bytes(range(0x80, 0x100)) * 40, "no text encoding"),
        (b"\xff\xfe\x00", "byte-order mark"),
    ],
)
def test_unusable_text_is_skipped_with_a_reason(data, reason):
    with pytest.raises(SkipFile, match=reason):
        _load("x.txt", data)


def test_encodings_are_detected():
    assert decode_text("naïve".encode("utf-16"))[:2] == ("naïve", "utf-16")
    assert decode_text(b"\xef\xbb\xbfbom")[:2] == ("bom", "utf-8-sig")
    text = "Le café est prêt. Voilà une façade très naïve, à côté de l'hôtel. " * 10
    assert decode_text(text.encode("cp1252")) == (text, "cp1252", True)


def test_a_guessed_encoding_is_passed_on_with_the_documents():
    text = "Voilà une façade très naïve.\n"
    assert _load("fr.txt", text.encode("cp1252")).guessed_encoding == "cp1252"
    assert _load("fr.txt", text.encode("utf-8")).guessed_encoding is None
    records = '{"id": "a", "text": "Grüße aus München"}\n'.encode("latin-1")
    loaded = _load("r.jsonl", records)
    assert loaded.guessed_encoding == "cp1252" and "München" in loaded.documents[0].sections[0].text


def test_unknown_format_is_skipped():
    with pytest.raises(SkipFile, match="unsupported format .xyz"):
        _load("a.xyz", b"data")


def test_only_legacy_encoded_text_carries_the_decoder_version_in_its_fingerprint() -> None:
    # A better guess for non-UTF-8 text must re-ingest those files, and only those: UTF-8 text
    # and binary formats decode the same whatever the code-page guesser does.
    import hashlib

    from ingest.formats import LEGACY_DECODER_VERSION, content_fingerprint

    utf8 = "Café crème".encode()
    legacy = "Café crème".encode("cp1252")
    assert content_fingerprint(Path("a.md"), utf8) == hashlib.sha256(utf8).hexdigest()
    assert content_fingerprint(Path("a.md"), legacy).endswith(f"legacy{LEGACY_DECODER_VERSION}")
    assert content_fingerprint(Path("a.pdf"), legacy) == hashlib.sha256(legacy).hexdigest()
