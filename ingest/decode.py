"""Bytes to text: UTF-8 first, then a detected encoding, else a reason to skip."""

from __future__ import annotations

import codecs

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


def decode_text(data: bytes) -> tuple[str, str]:
    """Return (text, encoding). Raises SkipFile for binary data or an undetectable encoding."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(encoding), encoding
            except UnicodeDecodeError as exc:
                raise SkipFile(
                    f"starts with a {encoding} byte-order mark but is not {encoding}"
                ) from exc
    if b"\x00" in data[:8192]:
        raise SkipFile("binary file (NUL bytes), not text")
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(data[:_SAMPLE_BYTES]).best()
    if best is None or best.encoding is None:
        raise SkipFile("not UTF-8 and no text encoding could be detected")
    try:
        return data.decode(best.encoding), best.encoding
    except (UnicodeDecodeError, LookupError) as exc:
        raise SkipFile(
            f"not UTF-8, and not {best.encoding} either ({exc.__class__.__name__})"
        ) from exc
