"""The generator's tokenizer for ingest: token counts for chunking and token ids for the store.

Loads `tokenizer.json` with the `tokenizers` library straight from the prepared model folder: the
same ids as the generator's `TokenizerWrapper.encode(text, add_special_tokens=False)` (a test checks
it), without importing transformers, so an incremental job with little to do starts fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragcache.store import tokenizer_identity


@dataclass
class GeneratorTokens:
    """Implements chunker.Tokens; `identity` keys the stored token ids to this tokenizer."""

    backend: Any  # tokenizers.Tokenizer
    identity: str

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets


def tokenizer_folder(spec: str, home: Path) -> Path:
    """The folder holding the model's tokenizer files (embedded models are prepared on demand)."""
    from ragcache.model_loader import resolve_model_path

    target = resolve_model_path(spec, home)
    if isinstance(target, str):
        from huggingface_hub import snapshot_download

        target = Path(snapshot_download(target, allow_patterns=["*.json", "*.model", "*.txt"]))
    return target


def load_tokens(folder: Path) -> GeneratorTokens:
    """Load the tokenizer from `folder`. Raises ModelNotFoundError if it has no tokenizer.json."""
    from tokenizers import Tokenizer

    from ragcache.errors import ModelNotFoundError

    path = folder / "tokenizer.json"
    if not path.exists():
        raise ModelNotFoundError(
            f"{folder} has no tokenizer.json, which ingest needs to count and store tokens",
            hint="use a model folder with a fast (tokenizer.json) tokenizer",
        )
    return GeneratorTokens(Tokenizer.from_file(str(path)), tokenizer_identity(folder))
