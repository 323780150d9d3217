"""A bounded load run: N concurrent clients, each sending one request of a mix of endpoints, every
one ending as answered (complete body), refused (429) or lost (anything else: error, hang, cut)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass

import httpx

QUESTIONS = [
    "What does a cache keep?",
    "How are embeddings compared?",
    "Where does LanceDB store tables?",
    "How does full-text search rank documents?",
]


@dataclass(frozen=True)
class LoadResult:
    clients: int
    answered: int
    refused: int
    lost: int
    outcomes: dict[str, int]  # outcome label -> count
    seconds: float


def _request(i: int) -> tuple[str, dict, bool]:
    q = QUESTIONS[i % len(QUESTIONS)]
    kind = i % 4
    if kind == 0:
        return "/v1/ask", {"question": q, "k": 2, "max_tokens": 8, "stream": False}, False
    if kind == 1:
        return "/v1/ask", {"question": q, "k": 2, "max_tokens": 8}, True
    if kind == 2:
        body = {"messages": [{"role": "user", "content": q}], "max_tokens": 8, "stream": True}
        return "/v1/chat/completions", body, True
    return "/v1/completions", {"prompt": q, "max_tokens": 8}, False


async def _one(http: httpx.AsyncClient, i: int, timeout_s: float) -> str:
    path, body, streamed = _request(i)
    try:
        async with asyncio.timeout(timeout_s):
            async with http.stream("POST", path, json=body) as r:
                text = (await r.aread()).decode()
    except TimeoutError:
        return "lost: hung"
    except httpx.HTTPError as exc:
        return f"lost: {type(exc).__name__}"
    if r.status_code == 429:
        return (
            "refused"
            if int(r.headers.get("retry-after", "0")) >= 1
            else "lost: 429 without Retry-After"
        )
    if r.status_code != 200:
        return f"lost: status {r.status_code}"
    if not streamed:
        data = json.loads(text)
        complete = "usage" in data
    elif path == "/v1/ask":
        complete = "event: done" in text
    else:
        complete = text.rstrip().endswith("data: [DONE]")
    return "answered" if complete else "lost: cut short"


async def run_load(
    base_url: str, clients: int, headers: dict[str, str] | None = None, timeout_s: float = 120
) -> LoadResult:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=timeout_s
    ) as http:
        outcomes = await asyncio.gather(*(_one(http, i, timeout_s) for i in range(clients)))
    counts = Counter(outcomes)
    answered, refused = counts["answered"], counts["refused"]
    return LoadResult(
        clients=clients,
        answered=answered,
        refused=refused,
        lost=clients - answered - refused,
        outcomes=dict(counts),
        seconds=round(loop.time() - start, 3),
    )
