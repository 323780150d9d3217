"""End to end with the embedded SmolLM2-135M-Instruct over three real FAQ documents."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from ingest.pipeline import JobSpec, run_job
from ragcache.datasets import load_dataset
from ragcache.settings import Settings
from serve.settings import ServeSettings
from tests.ingest_support import embedder
from tests.serve.server import ServerThread, free_port
from tests.serve.sse import parse_sse

MODEL = "smollm2-135m-instruct"


@pytest.mark.slow
def test_cited_answers_and_openai_chat_with_the_embedded_model(
    tmp_path: Path, core: Settings
) -> None:
    dataset = load_dataset()
    faq = dataset.corpus_dir / "faq" / "general"
    files = [faq / f"q00{i}.rst" for i in (1, 2, 3)]
    run_job(
        JobSpec(paths=tuple(map(str, files)), db_dir=tmp_path / "db", generator=MODEL),
        core.home,
        embedder=embedder(),
    )
    settings = ServeSettings(
        port=free_port(),
        db_dir=tmp_path / "db",
        model=MODEL,
        cache_dir=tmp_path / "kv",
        max_tokens=64,
    )
    server = ServerThread(settings, core).start()
    try:
        question = next(q for q in dataset.questions if q.id == "faq-general-002")
        # auto: the model runs (and its prompt is cached), its answer is kept only if supported.
        body = {"question": question.question, "k": 3, "max_tokens": 48, "mode": "auto"}
        with httpx.stream("POST", f"{server.base_url}/v1/ask", json=body, timeout=300) as r:
            events = list(parse_sse(r.iter_lines()))
        done = events[-1].json()
        assert events[-1].event == "done" and done["answer"].strip()
        assert "Foundation" in done["answer"] or "PSF" in done["answer"], done["answer"]
        # Files ingested one by one get their file name as id: q002.rst holds the gold passage.
        assert "q002.rst" in {s["doc_id"] for s in done["sources"]}
        again = httpx.post(f"{server.base_url}/v1/ask", json={**body, "stream": False}, timeout=300)
        usage = again.json()["usage"]
        assert usage["cached_tokens"] >= usage["prompt_tokens"] - 1

        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        chat = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is Python? Answer in one sentence."}],
            max_tokens=32,
        )
        assert "Python" in chat.choices[0].message.content
    finally:
        server.stop()
