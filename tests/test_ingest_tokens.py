"""Ingest's tokenizer gives the generator's own token ids, and its identity keys them."""

from __future__ import annotations

import shutil

from ingest.tokens import load_tokens, tokenizer_folder
from ragcache.model_loader import load_tokenizer
from ragcache.settings import load_settings
from ragcache.store import tokenizer_identity
from tests.ingest_support import GENERATOR, generator_tokens

SAMPLES = [
    "Hello world.",
    "  leading spaces and trailing  ",
    "def f(x):\n    return x ** 2  # code\n",
    "Ünïcödé, 日本語, emoji 🙂 and a tab\there.",
    "Guide > Install\n\nRun `pip install ragcache`.",
]


def test_token_ids_match_the_generators_tokenizer_wrapper():
    wrapper = load_tokenizer(GENERATOR, load_settings().home)
    tokens = generator_tokens()
    for text in SAMPLES:
        assert tokens.encode(text) == wrapper.encode(text, add_special_tokens=False)


def test_identity_follows_the_tokenizer_files(tmp_path):
    folder = tokenizer_folder(GENERATOR, load_settings().home)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("*.safetensors"))
    assert tokenizer_identity(copy) == generator_tokens().identity == load_tokens(copy).identity
    config = copy / "tokenizer_config.json"
    config.write_text(config.read_text().replace("}", ', "x": 1}', 1))
    assert tokenizer_identity(copy) != generator_tokens().identity
