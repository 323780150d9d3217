"""The chunker with the generator's real tokenizer: properties (deterministic, covers all text,
within size bounds) and the structure it prefers (paragraphs, then sentences, cut last)."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.chunker import ChunkSettings, chunk_sections
from ingest.documents import Section
from tests.ingest_support import generator_tokens

WORDS = st.sampled_from(
    ["cache", "token", "Vector", "naïve", "日本語", "x=1;", "def", "(a,", "b)", "émoji🙂", "Ünïcode",
     "a", "the", "ragcache", "—", "https://example.org/path", "3.14", "don't"]
)  # fmt: skip
SENTENCE = st.lists(WORDS, min_size=1, max_size=25).map(" ".join).map(lambda s: s + ".")
PARAGRAPH = st.lists(SENTENCE, min_size=1, max_size=12).map(" ".join)
TEXT = st.lists(PARAGRAPH, min_size=1, max_size=8).map("\n\n".join)
HEADINGS = st.lists(st.sampled_from(["Intro", "Setup", "Über", "API reference"]), max_size=3)


def _covered(text: str, chunks) -> bool:
    covered = bytearray(len(text))
    for c in chunks:
        covered[c.start : c.end] = b"\x01" * (c.end - c.start)
    return all(covered[i] or text[i].isspace() for i in range(len(text)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXT, path=HEADINGS, target=st.integers(16, 300), overlap_frac=st.floats(0, 0.45))
def test_chunks_cover_all_text_within_bounds_and_repeat_exactly(text, path, target, overlap_frac):
    tokens = generator_tokens()
    cfg = ChunkSettings(target_tokens=target, overlap_tokens=int(target * overlap_frac))
    sections = [Section(tuple(path), text)]
    chunks = chunk_sections(sections, tokens, cfg)
    assert chunks == chunk_sections(sections, tokens, cfg)  # deterministic
    assert _covered(text, chunks)
    for c in chunks:
        assert 0 < len(c.token_ids) <= target
        assert list(c.token_ids) == tokens.encode(c.text)
        assert c.text.endswith(text[c.start : c.end])
        assert c.heading_path == tuple(path)
    starts = [c.start for c in chunks]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)  # always moves forward


def test_paragraphs_are_kept_whole_when_they_fit():
    tokens = generator_tokens()
    para = "Caches avoid repeated work by keeping results. " * 6
    text = f"{para.strip()}\n\n{para.strip()}\n\n{para.strip()}"
    n_para = len(tokens.encode(para.strip()))
    chunks = chunk_sections([Section((), text)], tokens, ChunkSettings(n_para + 5, 0))
    assert [c.text for c in chunks] == [para.strip()] * 3


def test_long_paragraph_is_cut_at_sentence_ends():
    tokens = generator_tokens()
    text = " ".join(f"Sentence number {i} talks about caching keys and values." for i in range(60))
    chunks = chunk_sections([Section((), text)], tokens, ChunkSettings(64, 0))
    assert len(chunks) > 5
    assert all(c.text.rstrip().endswith(".") for c in chunks)


def test_heading_path_is_the_header_line_and_metadata():
    tokens = generator_tokens()
    sections = [Section(("Guide", "Install"), "Run pip install ragcache."), Section((), "Tail.")]
    chunks = chunk_sections(sections, tokens)
    assert chunks[0].text == "Guide > Install\n\nRun pip install ragcache."
    assert chunks[0].heading_path == ("Guide", "Install") and chunks[0].section == 0
    assert chunks[1].text == "Tail." and chunks[1].section == 1


def test_overlap_repeats_the_previous_tail():
    tokens = generator_tokens()
    text = " ".join(f"Fact {i} is about the cache tree." for i in range(40))
    chunks = chunk_sections([Section((), text)], tokens, ChunkSettings(48, 16))
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b.start < a.end  # the next chunk starts inside the previous one


def test_single_line_without_spaces_is_hard_cut_quickly():
    tokens = generator_tokens()
    text = "abcdefghij0123456789" * 50_000  # 1 MB, no structure at all
    start = time.perf_counter()
    chunks = chunk_sections([Section((), text)], tokens, ChunkSettings(200, 0))
    elapsed = time.perf_counter() - start
    assert elapsed < 20
    assert all(len(c.token_ids) <= 200 for c in chunks)
    assert "".join(c.text for c in chunks) == text  # no overlap: the cuts tile the text exactly


def test_too_small_target_is_refused():
    with pytest.raises(ValueError):
        chunk_sections([Section((), "x")], generator_tokens(), ChunkSettings(8, 0))
