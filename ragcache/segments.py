"""Prompts made of segments, each tokenized on its own.

A RAG prompt is `[system][chunk a][chunk b]...[question]`. Tokenizing the joined string can merge
tokens across a boundary, so the same chunk would get different ids in different prompts and no
prefix could be shared. Tokenizing each segment alone gives a chunk the same ids wherever it stands.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Segment = str | Sequence[int]  # text, or token ids computed earlier (e.g. stored at ingest time)


@dataclass(frozen=True)
class SegmentedPrompt:
    tokens: list[int]
    boundaries: list[int]  # end offset of each segment; the last equals len(tokens)
    kinds: list[str] = field(default_factory=list)  # optional label per segment: system, chunk, ...
    # [start, end) of each chunk's position-independent tokens (its stored ids, after the
    # numbered marker): what chunk reuse may copy from a chunk entry.
    chunk_spans: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


def _encode(tokenizer: Any, text: str, first: bool) -> list[int]:
    # Only the first segment may get a BOS, and not when its text already starts with one
    # (chat templates often write it), which is the rule mlx-lm's own generate uses.
    bos = getattr(tokenizer, "bos_token", None)
    add_special = first and (bos is None or not text.startswith(bos))
    return list(tokenizer.encode(text, add_special_tokens=add_special))


def encode_segments(
    tokenizer: Any, segments: Sequence[Segment], kinds: Sequence[str] | None = None
) -> SegmentedPrompt:
    """Tokenize each text segment on its own (ids pass through) and concatenate.

    Empty segments are dropped with their kind. Raises ValueError if nothing is left.
    """
    tokens: list[int] = []
    boundaries: list[int] = []
    out_kinds: list[str] = []
    for i, segment in enumerate(segments):
        ids = _encode(tokenizer, segment, not tokens) if isinstance(segment, str) else list(segment)
        if not ids:
            continue
        tokens.extend(ids)
        boundaries.append(len(tokens))
        out_kinds.append(kinds[i] if kinds else "text")
    if not tokens:
        raise ValueError("the prompt is empty")
    return SegmentedPrompt(tokens, boundaries, out_kinds)


@dataclass(frozen=True)
class Message:
    role: str  # system, user, assistant
    parts: tuple[str, ...]  # the content, split where segment boundaries belong
    kinds: tuple[str, ...] = ()


def split_rendered(rendered: str, parts: Sequence[str]) -> list[str]:
    """Cut a rendered chat string into one piece per part.

    A piece runs from the start of its part to the start of the next one, so template text between
    parts (closing tags, the next role's header) ends the earlier piece: the system piece then
    covers everything up to the first chunk, and a chunk piece is the chunk's text alone. Text
    before the first part joins the first piece; the generation prompt joins the last. Raises
    ValueError if a part is not found in order (templates that rewrite message content).
    """
    starts: list[int] = []
    cursor = 0
    for part in parts:
        if not part:
            continue
        at = rendered.find(part, cursor)
        if at < 0:
            raise ValueError("the chat template changed a message's text; cannot keep segments")
        starts.append(at)
        cursor = at + len(part)
    if not starts:
        return [rendered] if rendered else []
    cuts = [0, *starts[1:], len(rendered)]
    return [rendered[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def encode_chat(
    tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = True
) -> SegmentedPrompt:
    """Render messages through the tokenizer's chat template and keep each part a segment."""
    rendered = tokenizer.apply_chat_template(
        [{"role": m.role, "content": "".join(m.parts)} for m in messages],
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    parts = [p for m in messages for p in m.parts]
    kinds = [k for m in messages for k in (m.kinds or ("text",) * len(m.parts))]
    kinds = [k for p, k in zip(parts, kinds, strict=True) if p]
    pieces = split_rendered(rendered, parts)
    return encode_segments(tokenizer, pieces, kinds)
