"""Bytes to text: a byte-order mark, then UTF-8, then the most plausible legacy code page, else a
reason to skip. Only the last is a guess, and `Decoded.guessed` says so."""

from __future__ import annotations

import codecs
from typing import NamedTuple

from ingest.codepages import rank
from ingest.documents import SkipFile

# Detection reads a sample: enough to be sure, bounded so a large file costs no more than a small one.
_SAMPLE_BYTES = 256 * 1024
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


class Decoded(NamedTuple):
    """A file's text, the codec that produced it, and whether that codec was a guess (neither a
    byte-order mark nor valid UTF-8 said so)."""

    text: str
    encoding: str
    guessed: bool = False


def decode_text(data: bytes) -> Decoded:
    """Decode a file's bytes. Raises SkipFile for binary data or an undetectable encoding."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return Decoded(data.decode(encoding), encoding)
            except UnicodeDecodeError as exc:
                raise SkipFile(
                    f"starts with a {encoding} byte-order mark but is not {encoding}"
                ) from exc
    if b"\x00" in data[:8192]:
        raise SkipFile("binary file (NUL bytes), not text")
    try:
        return Decoded(data.decode("utf-8"), "utf-8")
    except UnicodeDecodeError:
        pass
    return _guess(data)


def _guess(data: bytes) -> Decoded:
    from charset_normalizer import from_bytes

    sample = data[:_SAMPLE_BYTES]
    # charset_normalizer decides whether this is text at all (it finds nothing in noise) and
    # proposes code pages; codepages.rank picks among them, since its order is unreliable.
    proposed = [m.encoding for m in from_bytes(sample) if m.encoding]
    if not proposed:
        raise SkipFile("not UTF-8 and no text encoding could be detected")
    ranked = rank(sample, proposed)
    for candidate in ranked:
        try:  # the sample decoded; the rest of the file may still hold a byte it cannot
            return Decoded(data.decode(candidate.encoding), candidate.encoding, guessed=True)
        except UnicodeDecodeError:
            continue
    tried = ", ".join(c.encoding for c in ranked) or ", ".join(proposed)
    raise SkipFile(f"not UTF-8, and not {tried} either")
