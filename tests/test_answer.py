"""The query path end to end on real parts: LanceDB in tmp_path, the bundled embedder, a tiny
model (fast) or the embedded SmolLM2 (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ingest.pipeline import JobSpec, run_job
from ragcache.answer import AnswerDone, Answerer, AnswerSettings, Conversation, SourcesEvent
from ragcache.answer_policy import ANSWER_MODES, DECLINE_TEXT, AnswerPolicySettings
from ragcache.cache import CacheSettings, PrefixCache
from ragcache.embedder import SentenceTransformerEmbedder
from ragcache.engine import Engine, TextDelta
from ragcache.errors import ConfigError, InvalidRequestError
from ragcache.model_loader import LoadedModel
from ragcache.retrieve import RetrievalSettings, Retriever
from ragcache.sampling import SamplingParams
from ragcache.sentences import split_sentences
from ragcache.store import open_store

DOCS = {
    "tea.md": "# Tea\n\nGreen tea is made from leaves that are not oxidised. Black tea is fully "
    "oxidised, which gives it a darker colour and a stronger taste.\n",
    "python.md": "# Python\n\nPython uses indentation to group statements. Guido van Rossum chose "
    "it because it makes programs shorter and clearer.\n",
    "cache.md": "# Caches\n\nA prefix cache keeps the keys and values of prompts it has seen, so a "
    "prompt that shares a prefix with an earlier one only computes the rest.\n",
    "rivers.md": "# Rivers\n\nThe Nile is the longest river in Africa. The Amazon carries the most "
    "water of any river on Earth.\n",
}


@pytest.fixture(scope="module")
def embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder()


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, tiny_llama: LoadedModel, embedder) -> Path:
    root = tmp_path_factory.mktemp("answer")
    for name, text in DOCS.items():
        (root / name).write_text(text)
    db = root / "db"
    run_job(
        JobSpec(paths=(str(root),), db_dir=db, generator=str(tiny_llama.path)),
        root / "home",
        embedder=embedder,
    )
    return db


# The tiny models write noise: these tests are about the engine path, so the model always runs.
ALWAYS_GENERATE = AnswerPolicySettings(mode="generate", decline_below=0.0)


def _answerer(
    loaded: LoadedModel,
    db: Path,
    embedder,
    order: str = "cache",
    policy: AnswerPolicySettings = ALWAYS_GENERATE,
) -> Answerer:
    cache = PrefixCache(loaded, CacheSettings(cache_bytes=1 << 28))
    retriever = Retriever(open_store(db), embedder)
    settings = AnswerSettings(order=order, policy=policy)
    return Answerer(Engine(loaded, cache=cache), retriever, settings)


def _ask(answerer: Answerer, question: str, **kw) -> tuple[SourcesEvent, str, AnswerDone]:
    events = list(answerer.ask(question, params=SamplingParams(max_tokens=8), **kw))
    assert isinstance(events[0], SourcesEvent) and isinstance(events[-1], AnswerDone)
    text = "".join(e.text for e in events[1:-1] if isinstance(e, TextDelta))
    return events[0], text, events[-1]


def test_answer_streams_with_numbered_sources_and_reuses_the_cache(
    tiny_llama: LoadedModel, tiny_store: Path, embedder
) -> None:
    answerer = _answerer(tiny_llama, tiny_store, embedder)
    sources, text, done = _ask(answerer, "Why does Python use indentation?", k=3)
    assert [s.number for s in sources.sources] == [1, 2, 3]
    assert text == done.completion.text  # the stream is the model's text; done.text is checked
    assert any("python" in s.source for s in sources.sources)
    assert done.figures.prompt_tokens > 0 and done.figures.retrieval_ms > 0
    stats = done.completion.stats
    assert (done.figures.drafted_tokens, done.figures.accepted_tokens) == (
        stats.drafted_tokens,
        stats.accepted_tokens,
    )
    again = _ask(answerer, "Why does Python use indentation?", k=3)[2]
    assert again.completion.tokens == done.completion.tokens  # the cache never changes results
    assert again.figures.cached_tokens == again.figures.prompt_tokens - 1
    other = _ask(answerer, "Which river is the longest in Africa?", k=3)[2]
    assert other.figures.cached_tokens > 0  # at least the system prompt


def test_follow_up_extends_the_conversation_path(
    tiny_llama: LoadedModel, tiny_store: Path, embedder
) -> None:
    answerer = _answerer(tiny_llama, tiny_store, embedder)
    conversation = Conversation()
    first = _ask(answerer, "How is black tea made?", k=2, conversation=conversation)[2]
    second = _ask(answerer, "And green tea?", k=2, conversation=conversation)[2]
    turn1 = first.figures.prompt_tokens + first.figures.generated_tokens
    assert second.figures.cached_tokens >= turn1 - 1
    numbers = [s.number for s in conversation.sources]
    assert numbers == list(range(1, len(numbers) + 1))  # numbering continues across turns


def test_extract_mode_quotes_the_passage_without_running_the_model(
    tiny_llama: LoadedModel, tiny_store: Path, embedder
) -> None:
    answerer = _answerer(tiny_llama, tiny_store, embedder, policy=AnswerPolicySettings())
    sources, text, done = _ask(answerer, "Why does Python use indentation?", k=3, mode="extract")
    assert text == "" and done.completion.tokens == [] and done.method == "extracted"
    assert done.figures.finish_reason == "extracted" and done.figures.cached_tokens == 0
    (citation,) = done.quotes
    prepared = answerer.prepare("Why does Python use indentation?", k=3, mode="extract")
    assert prepared.evidence is not None
    texts = {p.chunk_id: p.text for p in prepared.evidence.passages}
    chunk_text = texts[citation.source.chunk_id]
    assert chunk_text[citation.quote.start : citation.quote.end] == citation.quote.text
    assert "indentation" in citation.quote.text.lower()
    assert f"[{citation.source.number}]" in done.text and done.citations == [citation.source]


def test_a_question_the_store_cannot_answer_is_declined(
    tiny_llama: LoadedModel, tiny_store: Path, embedder
) -> None:
    answerer = _answerer(tiny_llama, tiny_store, embedder, policy=AnswerPolicySettings())
    for mode in ANSWER_MODES:
        _, text, done = _ask(answerer, "What is the airspeed velocity of a swallow?", mode=mode)
        assert done.declined and done.text == DECLINE_TEXT and done.citations == []
        assert text == "" and done.completion.tokens == []  # declined before generation
        assert done.sources  # the closest sources are still shown


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"question": "   "}, "empty"),
        ({"question": "tea?", "k": 0}, "k must be"),
        ({"question": "tea?", "k": 51}, "k must be"),
        ({"question": "tea?", "order": "random"}, "unknown order"),
        ({"question": "tea?", "mode": "guess"}, "unknown answer mode"),
    ],
)
def test_bad_questions_get_clear_errors(
    tiny_llama: LoadedModel, tiny_store: Path, embedder, kwargs: dict, message: str
) -> None:
    answerer = _answerer(tiny_llama, tiny_store, embedder)
    question = kwargs.pop("question")
    with pytest.raises(InvalidRequestError, match=message):
        list(answerer.ask(question, **kwargs))


def test_empty_store_and_other_embedder_are_refused(tmp_path: Path, embedder) -> None:
    store = open_store(tmp_path / "db", dim=embedder.dim, embedder_id=embedder.identity)
    with pytest.raises(InvalidRequestError, match="empty"):
        Retriever(store, embedder).retrieve("tea?")
    other = open_store(tmp_path / "db8", dim=8, embedder_id="another-embedder")
    with pytest.raises(ConfigError, match="another embedder"):
        Retriever(other, embedder)


@pytest.mark.slow
def test_ask_cli_answers_from_the_faq_with_smollm2(tmp_path: Path, home: Path) -> None:
    faq = Path(__file__).resolve().parents[1] / "datasets" / "python_docs" / "faq" / "design"
    db = tmp_path / "db"
    env = {**os.environ}
    cmd = [sys.executable, "-m", "ragcache.cli"]
    ingest = subprocess.run(
        [*cmd, "ingest", str(faq), "--db", str(db), "--json"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert ingest.returncode == 0, ingest.stderr
    ask = [
        *cmd,
        "ask",
        "Why does Python use indentation for grouping of statements?",
        "--db",
        str(db),
        "--json",
        "--max-tokens",
        "24",
        "--mode",
        "auto",  # the model runs: the second process must find its prompt on disk
        "--cache-dir",
        str(tmp_path / "kv"),
    ]
    first = subprocess.run(ask, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stderr
    answer = json.loads(first.stdout.strip().splitlines()[-1])
    assert any(s["doc_id"].endswith("design/q001.rst") for s in answer["sources"])
    assert answer["answer"].strip()
    # A second process starts warm from the disk tier.
    second = json.loads(
        subprocess.run(ask, capture_output=True, text=True, timeout=600, env=env)
        .stdout.strip()
        .splitlines()[-1]
    )
    assert second["figures"]["cached_tokens"] >= second["figures"]["prompt_tokens"] - 1
    assert second["answer"] == answer["answer"]


@pytest.mark.parametrize(
    "question",
    [
        "Pourquoi Python utilise-t-il l'indentation pour grouper les instructions ?",  # French
        "indentation",  # a bare keyword
        " ".join(["Why does Python group statements by indentation and not braces?"] * 40),
    ],
)
def test_odd_questions_get_an_answer_or_a_decline_never_a_loop(
    tiny_llama: LoadedModel, tiny_store: Path, embedder, question: str
) -> None:
    answerer = _answerer(tiny_llama, tiny_store, embedder, policy=AnswerPolicySettings())
    for mode in ANSWER_MODES:
        events = list(answerer.ask(question, k=3, mode=mode))
        done = events[-1]
        assert isinstance(done, AnswerDone) and done.text.strip()
        assert done.method in {"generated", "extracted", "declined"}
        said = [x.text for x in split_sentences(done.text)]
        assert len(said) == len(set(said))  # what the user reads never repeats itself
        if not done.declined:
            assert done.quotes and all(q.quote.text for q in done.quotes)


NAMED = {
    "widgets.md": "# Widgets\n\nFrob settings change how widgets behave at run time. Every frob "
    "setting of a widget can be changed while the widget runs.\n",
    "runtime.md": "# Run time\n\nAt run time a widget changes how it behaves when one of its frob "
    "settings changes.\n",
    "behaviour.md": "# Behaviour\n\nHow widgets behave depends on their frob settings, which "
    "change at run time.\n",
    "limits.md": "# Limits\n\nfrob.limit_count\nThe most presses a day. Defaults to 7.\n",
    "sizes.md": "# Sizes\n\nwidget.max_size\nThe largest press. Defaults to 3.\n",
    "rivers.md": DOCS["rivers.md"],
}


def test_a_name_no_retrieved_chunk_mentions_is_looked_up_in_the_store(
    tmp_path: Path, tiny_llama: LoadedModel, embedder
) -> None:
    for name, text in NAMED.items():
        (tmp_path / name).write_text(text)
    db = tmp_path / "db"
    spec = JobSpec(paths=(str(tmp_path),), db_dir=db, generator=str(tiny_llama.path))
    run_job(spec, tmp_path / "home", embedder=embedder)
    store = open_store(db)
    question = "How do widgets change how they behave at run time with frob.limit_count?"

    def hits(**kw) -> list:
        settings = RetrievalSettings(**{"k": 2, "mode": "vector", **kw})
        return Retriever(store, embedder, settings).retrieve(question).hits

    plain = hits(name_lookup=0)
    assert all("frob.limit_count" not in h.text for h in plain)  # the vector arm misses it
    looked_up = hits()
    assert [h.doc_id for h in looked_up][:1] == [plain[0].doc_id]
    assert looked_up[1].doc_id.endswith("limits.md") and "frob.limit_count" in looked_up[1].text
    assert looked_up[1].score == plain[1].score  # it takes the displaced hit's place and score
    assert hits(k=1) == plain[:1]  # the top hit is never displaced
    # Two unmatched names: one place each, in turn.
    both = (
        "How do widgets change how they behave at run time with frob.limit_count and "
        "widget.max_size?"
    )
    settings = RetrievalSettings(k=3, mode="vector")
    found = Retriever(store, embedder, settings).retrieve(both).hits
    assert {h.doc_id.rsplit("/", 1)[-1] for h in found[1:]} == {"limits.md", "sizes.md"}
    # A chunk already in the conversation is no place's worth: the lookup skips it.
    limits_id = looked_up[1].chunk_id
    skipped = Retriever(store, embedder, RetrievalSettings(k=2, mode="vector"))
    assert skipped.retrieve(question, exclude=frozenset({limits_id})).hits == plain
    # A name the store never mentions changes nothing: the answer policy declines it as unknown.
    other = "How do widgets change how they behave at run time with frob.limit_total?"
    unknown = Retriever(store, embedder, RetrievalSettings(k=2, mode="vector")).retrieve(other)
    assert all("frob.limit" not in h.text for h in unknown.hits)
    with pytest.raises(ConfigError, match="name_lookup"):
        Retriever(store, embedder, RetrievalSettings(name_lookup=-1))
    answerer = Answerer(
        Engine(tiny_llama), Retriever(store, embedder, RetrievalSettings(k=2, mode="vector"))
    )
    done = list(answerer.ask(other, mode="extract"))[-1]
    assert isinstance(done, AnswerDone) and done.declined
