"""Segment tokenization: each segment on its own, boundaries, chat templates, stop matching."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from ragcache.model_loader import LoadedModel
from ragcache.sampling import StopMatcher
from ragcache.segments import Message, encode_chat, encode_segments, split_rendered


def test_each_segment_is_tokenized_on_its_own(tiny_llama: LoadedModel) -> None:
    tok = tiny_llama.tokenizer
    parts = ["System: use the context.", " chunk one about caches", " chunk two", " Question?"]
    prompt = encode_segments(tok, parts, ["system", "chunk", "chunk", "question"])
    assert prompt.boundaries[-1] == len(prompt.tokens)
    starts = [0, *prompt.boundaries[:-1]]
    for i, (a, b) in enumerate(zip(starts, prompt.boundaries, strict=True)):
        expected = tok.encode(parts[i], add_special_tokens=(i == 0))
        assert prompt.tokens[a:b] == expected
    # The same chunk has the same ids wherever it stands.
    moved = encode_segments(tok, [parts[0], parts[2], parts[1], parts[3]])
    two = prompt.tokens[prompt.boundaries[1] : prompt.boundaries[2]]
    assert moved.tokens[moved.boundaries[0] : moved.boundaries[1]] == two


def test_token_id_segments_pass_through(tiny_llama: LoadedModel) -> None:
    prompt = encode_segments(tiny_llama.tokenizer, ["hello", [5, 6, 7]])
    assert prompt.tokens[-3:] == [5, 6, 7]


def test_empty_prompt_is_an_error(tiny_llama: LoadedModel) -> None:
    with pytest.raises(ValueError, match="empty"):
        encode_segments(tiny_llama.tokenizer, ["", []])


def test_chat_template_keeps_chunks_as_their_own_segments(tiny_llama: LoadedModel) -> None:
    tok = tiny_llama.tokenizer
    chunks = ("alpha beta gamma. ", "delta epsilon. ")
    prompt = encode_chat(
        tok,
        [
            Message("system", ("You are a helpful assistant.",), ("system",)),
            Message("user", (*chunks, "what is zeta?"), ("chunk", "chunk", "question")),
        ],
    )
    assert prompt.kinds == ["system", "chunk", "chunk", "question"]
    for i, chunk in enumerate(chunks):
        a, b = prompt.boundaries[i], prompt.boundaries[i + 1]
        assert prompt.tokens[a:b] == tok.encode(chunk, add_special_tokens=False)
    assert tok.decode(prompt.tokens).endswith("assistant\n")


def test_split_rendered_rejects_rewritten_content() -> None:
    with pytest.raises(ValueError):
        split_rendered("<s>user\nHELLO</s>", ["hello"])


@given(
    text=st.text(alphabet="abc<>/", max_size=60),
    stops=st.lists(st.text(alphabet="abc<>/", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 60), max_size=10),
)
def test_stop_matcher_emits_exactly_the_text_before_the_first_stop(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    # With one stop inside another ("/" in "</<"), a stream must stop at the one that completes
    # first, which is not the one that starts first in the whole text: not what this checks.
    assume(not any(a != b and a in b for a in stops for b in stops))
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    matcher = StopMatcher(stops)
    out, hit = "", False
    for piece in pieces:
        emitted, hit = matcher.feed(piece)
        out += emitted
        if hit:
            break
    if not hit:
        out += matcher.flush()
    firsts = [text.find(s) for s in stops if s in text]
    expected = text[: min(firsts)] if firsts else text
    assert out == expected
    assert hit == bool(firsts)
