"""Sentence splitting keeps exact spans; documentation lines (terms, items) stand alone."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ragcache.sentences import (
    citation_numbers,
    content_words,
    defined_terms,
    identifiers,
    split_sentences,
    strip_citations,
)

MANUAL = """git-bisect - Use binary search to find the commit that introduced a bug

--follow
    Continue listing the history of a file beyond renames (works only
    for a single file). Defaults to 50. See also e.g. git-log.

* First item here
* Second item. Another one.
"""


def test_terms_items_and_sentences() -> None:
    texts = [s.text for s in split_sentences(MANUAL)]
    assert texts[0] == "git-bisect - Use binary search to find the commit that introduced a bug"
    assert texts[1] == "--follow"
    assert texts[2].startswith("Continue listing") and texts[2].endswith("for a single file).")
    assert "Defaults to 50." in texts and "See also e.g. git-log." in texts
    assert texts[-3:] == ["* First item here", "* Second item.", "Another one."]


def test_paragraph_starts() -> None:
    starts = {s.text: s.paragraph_start for s in split_sentences(MANUAL)}
    assert starts["--follow"] and not starts["Defaults to 50."]


@given(st.text(alphabet=st.sampled_from("ab. \n-*:1A?"), max_size=200))
def test_spans_are_exact_and_ordered(text: str) -> None:
    previous_end = 0
    for s in split_sentences(text):
        assert text[s.start : s.end] == s.text
        assert s.start >= previous_end and s.text == s.text.strip()
        previous_end = s.end


def test_citations_and_words() -> None:
    assert citation_numbers("It is so [2]. Also [10].") == [2, 10]
    assert strip_citations("It is so [2].") == "It is so."
    assert content_words("What does core.bare --follow do?") == [
        "core.bare",
        "core",
        "bare",
        "follow",
    ]


def test_identifiers_are_options_dotted_snake_and_camel_names() -> None:
    q = "Is core.deltaBaseCacheLimit or --stdin-packs like max_age, isDir or list.sort()?"
    assert identifiers(q) == {
        "core.deltaBaseCacheLimit",
        "--stdin-packs",
        "max_age",
        "isDir",
        "list.sort",
    }
    assert identifiers("Why does Python use indentation for grouping of statements?") == set()


def test_defined_terms_cover_every_sentence_of_an_entry() -> None:
    """A reference entry's term is either its paragraph's first line or a block of its own
    above an indented description; a plain paragraph defines nothing."""
    text = (
        "pack.window\nThe size of the window. Defaults to 10.\n\n"
        "pack.windowMemory\nThe memory of the window. No limit.\n\n"
        "Plain prose here. And more.\n\n"
        "Unlike pack.windowMemory, the pack.window setting\ncontrols the objects. Wrapped.\n\n"
        "- Set core.bare\n- Then run it. Listed.\n\n"
        "--scheduler=<scheduler>\n    Specify the scheduler. Default is auto.\n"
    )
    sentences = split_sentences(text)
    terms = dict(
        zip((s.text.splitlines()[-1] for s in sentences), defined_terms(sentences), strict=True)
    )
    assert terms["Defaults to 10."] == "pack.window"
    assert terms["No limit."] == "pack.windowMemory"
    assert terms["And more."] == "" and terms["Plain prose here."] == ""
    assert terms["controls the objects."] == "" and terms["Wrapped."] == ""  # wrapped prose
    assert terms["Listed."] == ""  # a list item is no term
    assert terms["Default is auto."] == "--scheduler=<scheduler>"
