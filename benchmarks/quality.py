"""Answer quality on labelled questions: right, short, cited to the passage, declined when absent.

Three labelled sets, each split in two halves by a hash of the question id (`tune`: thresholds are
chosen on it; `report`: every goal is read from it):
- `git_docs` (short factual answers with gold pages and evidence lines, git's manual pages);
- `python_docs` (the bundled FAQ: long-form answers, gold documents);
- `unanswerable` (questions whose answer is not in the store they are asked of).

For each model, chunk order and question, the model runs once (when the answer policy lets it:
an unanswerable question with weak evidence is declined before generation) and every answer mode
is derived from the same retrieval, extraction and generation, so modes compare on equal terms:
`generate`, `extract`, `auto`. Metrics per (model, order, mode), on each half:

- `short_answer_accuracy`: the gold answer or an alias is in the answer (normalised words);
- `long_answer_token_recall` / `long_answer_token_f1`: against the gold passage's first sentences;
- `citation_precision`: cited quotes that come from the gold page (or contain its evidence line);
- `cited_answer_rate`: answered questions with at least one citation;
- `loop_rate`: answers that repeat a sentence or end at the token limit repeating themselves;
- `unanswerable_decline_rate`, `false_decline_rate` (declines among answerable questions);
- `median_answer_s`: question in, complete checked answer out; `cold` is the first ask of each
  question, `warm` the same question asked again (its prompt in the KV cache).

Thresholds (`decline_below`, attribution `min_support`) are calibrated on the tune half and printed
beside the report; the figures are computed with the settings the code ships.

    .venv/bin/python benchmarks/quality.py [--models smollm2-135m-instruct,...] [--limit N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ragcache  # noqa: E402,F401,I001  (optimized BLAS under MLX before mlx loads)

from benchmarks.common import machine, write_results  # noqa: E402
from ragcache.answer import Answerer, AnswerSettings, PreparedQuestion  # noqa: E402
from ragcache.answer_policy import ANSWER_MODES, AnswerPolicySettings, decide  # noqa: E402
from ragcache.attribution import attribute  # noqa: E402
from ragcache.cache import CacheSettings, PrefixCache  # noqa: E402
from ragcache.datasets import load_dataset, load_unanswerable  # noqa: E402
from ragcache.embedder import SentenceTransformerEmbedder  # noqa: E402
from ragcache.engine import Completion, Engine  # noqa: E402
from ragcache.loop_guard import find_loop  # noqa: E402
from ragcache.model_loader import load_model  # noqa: E402
from ragcache.retrieve import Retriever  # noqa: E402
from ragcache.sampling import SamplingParams  # noqa: E402
from ragcache.sentences import split_sentences, strip_citations  # noqa: E402
from ragcache.settings import load_settings  # noqa: E402
from ragcache.store import open_store  # noqa: E402

WORK = Path(__file__).resolve().parent / ".work" / "quality"
RESULTS = Path(__file__).resolve().parent / "results"
STORES = ("git_docs", "python_docs")


def half(question_id: str) -> str:
    """A fixed split: the same id always lands in the same half."""
    return "tune" if hashlib.sha1(question_id.encode()).digest()[0] % 2 == 0 else "report"


def build_store(name: str, home: Path) -> Path:
    """The dataset's corpus in its own LanceDB folder (incremental: a rerun embeds nothing)."""
    from ingest.pipeline import JobSpec, run_job

    db = WORK / f"db-{name}"
    report = run_job(JobSpec(paths=(str(load_dataset(name).corpus_dir),), db_dir=db), home)
    print(f"store {name}: {report.total_chunks} chunks ({report.elapsed_s:.0f} s)", flush=True)
    return db


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9_.\-]+", " ", text.lower()).replace("`", "").split())


def contains_answer(answer: str, golds: list[str]) -> bool:
    text = f" {normalise(strip_citations(answer))} "
    for gold in golds:
        g = normalise(gold)
        if g and re.search(rf"(?<![a-z0-9_\-]){re.escape(g)}(?![a-z0-9_])", text):
            return True
    return False


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", strip_citations(text).lower()).split()


def token_recall_f1(answer: str, gold: str) -> tuple[float, float]:
    p, g = _words(answer), _words(gold)
    common = sum(min(p.count(w), g.count(w)) for w in set(p))
    if not p or not g or common == 0:
        return 0.0, 0.0
    precision, recall = common / len(p), common / len(g)
    return recall, 2 * precision * recall / (precision + recall)


def loops(text: str, completion: Completion) -> bool:
    """What a user would call a loop: a sentence said twice, or a run to the limit that repeats."""
    said = [normalise(s.text) for s in split_sentences(strip_citations(text))]
    said = [s for s in said if len(s.split()) >= 3]
    if len(said) != len(set(said)):
        return True
    return completion.stats.finish_reason == "length" and find_loop(completion.tokens) is not None


# --- one run: every question once, generation shared by the modes -----------------------------


def run_questions(
    answerer: Answerer, questions: list[dict], order: str, params: SamplingParams, generate: bool
) -> list[dict]:
    """Prepare and (where any mode needs it) generate; keep what `decide` needs for each mode."""
    rows = []
    for i, q in enumerate(questions):
        started = time.perf_counter()
        mode = "generate" if generate else "extract"
        prepared = answerer.prepare(q["question"], order=order, mode=mode)
        prepare_s = time.perf_counter() - started
        completion = None
        if prepared.generate:
            completion = answerer.engine.generate(prepared.prompt, params)
        answerer.complete(prepared, completion, started)
        generate_s = time.perf_counter() - started
        rows.append(
            {
                **q,
                "prepared": prepared,
                "completion": completion,
                "prepare_s": prepare_s,
                "generate_s": generate_s,
            }
        )
        if (i + 1) % 20 == 0:
            print(f"  {order}: {i + 1}/{len(questions)}", flush=True)
    return rows


def answer_for(answerer: Answerer, row: dict, mode: str, policy: AnswerPolicySettings) -> dict:
    """The answer `mode` gives from the row's shared retrieval/generation, under `policy`."""
    prepared: PreparedQuestion = row["prepared"]
    completion: Completion | None = row["completion"]
    attributed = None
    if completion is not None and mode != "extract" and prepared.evidence is not None:
        attributed = attribute(
            completion.text, prepared.evidence, policy.attribution, answerer.embed
        )
    checked = decide(
        mode, prepared.extraction, attributed, policy, completion.text if completion else ""
    )
    by_number = {s.number: s for s in prepared.sources}
    cited = [
        {"number": qt.number, "doc_id": by_number[qt.number].doc_id, "quote": qt.text}
        for qt in checked.quotes
        if qt.number in by_number
    ]
    used_model = checked.method == "generated" or (
        mode != "extract" and completion is not None and not checked.declined
    )
    seconds = (
        row["generate_s"] if (mode != "extract" and completion is not None) else row["prepare_s"]
    )
    return {
        "text": checked.text,
        "method": checked.method,
        "declined": checked.declined,
        "confidence": round(checked.confidence, 4),
        "cited": cited,
        "model_text": completion.text if completion else "",
        "finish_reason": completion.stats.finish_reason if completion else checked.method,
        "loop": loops(checked.text, completion) if completion and used_model else False,
        "answer_s": seconds,
    }


def score(rows: list[dict], answers: list[dict]) -> dict[str, Any]:
    short, long_r, long_f, cites, cite_ok, answered, with_cite = [], [], [], 0, 0, 0, 0
    unans, unans_declined, ans, false_declines, loops_n, seconds = 0, 0, 0, 0, 0, []
    for row, a in zip(rows, answers, strict=True):
        seconds.append(a["answer_s"])
        loops_n += int(a["loop"])
        if row["kind"] == "unanswerable":
            unans += 1
            unans_declined += int(a["declined"])
            continue
        ans += 1
        false_declines += int(a["declined"])
        if row["kind"] == "short":
            short.append(float(not a["declined"] and contains_answer(a["text"], row["golds"])))
        else:
            r, f = token_recall_f1(a["text"], row["answer"]) if not a["declined"] else (0.0, 0.0)
            long_r.append(r)
            long_f.append(f)
        if a["declined"]:
            continue
        answered += 1
        with_cite += int(bool(a["cited"]))
        for c in a["cited"]:
            cites += 1
            evidence = row.get("evidence") or ""
            cite_ok += int(
                c["doc_id"] == row["gold_doc_id"]
                or (bool(evidence) and normalise(evidence) in normalise(c["quote"]))
            )

    def mean(xs: list[float]) -> float | None:
        return round(statistics.fmean(xs), 4) if xs else None

    return {
        "short_answer_accuracy": mean(short),
        "long_answer_token_recall": mean(long_r),
        "long_answer_token_f1": mean(long_f),
        "citation_precision": round(cite_ok / cites, 4) if cites else None,
        "cited_answer_rate": round(with_cite / answered, 4) if answered else None,
        "loop_rate": round(loops_n / len(rows), 4) if rows else None,
        "unanswerable_decline_rate": round(unans_declined / unans, 4) if unans else None,
        "false_decline_rate": round(false_declines / ans, 4) if ans else None,
        "median_answer_s": round(statistics.median(seconds), 3) if seconds else None,
        "questions": {"short": len(short), "long": len(long_r), "unanswerable": unans},
    }


def calibrate(answerer: Answerer, rows: list[dict], mode: str, base: AnswerPolicySettings) -> dict:
    """On the tune half: the decline threshold with the most declines of unanswerable questions
    while declining at most 10% of answerable ones, and the support threshold that then scores best."""
    best: tuple[float, float] | None = None
    for t in [x / 100 for x in range(20, 81, 2)]:
        policy = replace(base, decline_below=t)
        s = score(rows, [answer_for(answerer, r, mode, policy) for r in rows])
        if (s["false_decline_rate"] or 0) <= 0.1:
            key = (s["unanswerable_decline_rate"] or 0, -t)
            if best is None or key > (best[1], -best[0]):
                best = (t, s["unanswerable_decline_rate"] or 0)
    decline_below = best[0] if best else base.decline_below
    support = []
    for m in [x / 100 for x in range(30, 81, 5)]:
        policy = replace(
            base, decline_below=decline_below, attribution=replace(base.attribution, min_support=m)
        )
        s = score(rows, [answer_for(answerer, r, mode, policy) for r in rows])
        support.append((m, s))
    return {
        "decline_below": decline_below,
        "unanswerable_decline_rate_at_it": best[1] if best else None,
        "min_support_sweep": {
            str(m): {
                k: s[k]
                for k in ("short_answer_accuracy", "long_answer_token_recall", "citation_precision")
            }
            for m, s in support
        },
    }


def load_questions(limit: int | None) -> dict[str, list[dict]]:
    """Per store: its labelled questions and the unanswerable ones asked of it."""
    out: dict[str, list[dict]] = {name: [] for name in STORES}
    for name in STORES:
        kind = "short" if name == "git_docs" else "long"
        for q in load_dataset(name).questions:
            golds = [q.answer, *q.aliases]
            if q.id.startswith("git-cmd"):  # a bare "add" or "log" would match any answer
                golds = [g for g in golds if "git" in g]
            out[name].append(
                {
                    "id": q.id,
                    "question": q.question,
                    "kind": kind,
                    "answer": q.answer,
                    "golds": golds,
                    "gold_doc_id": q.gold_doc_id,
                    "evidence": q.evidence,
                    "store": name,
                }
            )
    for u in load_unanswerable():
        out[u.store].append(
            {
                "id": u.id,
                "question": u.question,
                "kind": "unanswerable",
                "answer": "",
                "golds": [],
                "gold_doc_id": "",
                "evidence": "",
                "store": u.store,
            }
        )
    if limit:
        for name in STORES:
            kinds: dict[str, list[dict]] = {}
            for q in out[name]:
                kinds.setdefault(q["kind"], []).append(q)
            out[name] = [q for qs in kinds.values() for q in qs[:limit]]
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        "short_answer_accuracy",
        "long_answer_token_recall",
        "citation_precision",
        "cited_answer_rate",
        "unanswerable_decline_rate",
        "false_decline_rate",
    ]
    runs = [(name, r) for name, r in result["runs"].items()]
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / max(1, len(runs))
    for i, (name, r) in enumerate(runs):
        vals = [r["report"].get(k) or 0 for k in keys]
        ax.bar([j + i * width for j in range(len(keys))], vals, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
    ax.set_xticklabels([k.replace("_", "\n") for k in keys], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title("Answer quality, report half (model / order / mode)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="smollm2-135m-instruct")
    ap.add_argument("--orders", default="cache,relevance", help="the first is the default order")
    ap.add_argument("--limit", type=int, default=None, help="at most N questions per set and kind")
    ap.add_argument("--halves", default="tune,report")
    ap.add_argument("--warm", type=int, default=20, help="questions re-asked to time a warm cache")
    ap.add_argument("--out", default="quality")
    ap.add_argument(
        "--modes", default=",".join(ANSWER_MODES), help="extract alone runs no model at all"
    )
    args = ap.parse_args()
    modes = args.modes.split(",")
    headline = AnswerSettings().policy.mode
    headline = headline if headline in modes else modes[0]  # the mode the summary keys report

    settings = load_settings()
    embedder = SentenceTransformerEmbedder()
    dbs = {name: build_store(name, settings.home) for name in STORES}
    halves = args.halves.split(",")
    questions = load_questions(args.limit)
    defaults = AnswerSettings()
    policy = defaults.policy
    params = SamplingParams(max_tokens=defaults.max_tokens)
    result: dict[str, Any] = {
        "machine": machine(),
        "default_mode": policy.mode,
        "headline_mode": headline,
        "default_order": defaults.order,
        "settings": {
            "decline_below": policy.decline_below,
            "min_support": policy.attribution.min_support,
            "max_tokens": defaults.max_tokens,
        },
        "runs": {},
        "calibration": {},
    }
    samples: list[dict] = []
    for model_name in args.models.split(","):
        loaded = load_model(model_name, settings.home)
        for order in args.orders.split(","):
            cache = PrefixCache(loaded, CacheSettings())  # fresh per order, RAM only
            engine = Engine(loaded, settings.generation, cache)
            # The tune half calibrates the default order only; other orders are compared on the
            # report half.
            order_halves = (
                halves if order == defaults.order else [h for h in halves if h == "report"]
            )
            rows_by_half: dict[str, list[dict]] = {h: [] for h in order_halves}
            answerers = {}
            for store in STORES:
                retriever = Retriever(open_store(dbs[store]), embedder)
                answerer = Answerer(engine, retriever, replace(defaults, order=order))
                answerers[store] = answerer
                for h in order_halves:
                    qs = [q for q in questions[store] if half(q["id"]) == h]
                    print(f"{model_name} {order} {store} {h}: {len(qs)} questions", flush=True)
                    for row in run_questions(answerer, qs, order, params, modes != ["extract"]):
                        row["answerer"] = answerer
                        rows_by_half[h].append(row)
            for mode in modes:
                name = f"{model_name}/{order}/{mode}"
                run: dict[str, Any] = {}
                for h, rows in rows_by_half.items():
                    answers = [answer_for(r["answerer"], r, mode, policy) for r in rows]
                    run[h] = score(rows, answers)
                    if h == "report" and mode == headline and order == defaults.order:
                        for r, a in zip(rows, answers, strict=True):
                            samples.append(
                                {
                                    "model": model_name,
                                    "id": r["id"],
                                    "kind": r["kind"],
                                    "question": r["question"],
                                    "gold": r["answer"],
                                    "gold_doc_id": r["gold_doc_id"],
                                    **{
                                        k: a[k]
                                        for k in (
                                            "text",
                                            "method",
                                            "confidence",
                                            "cited",
                                            "model_text",
                                            "finish_reason",
                                        )
                                    },
                                }
                            )
                if "tune" in rows_by_half and order == defaults.order:
                    any_answerer = next(iter(answerers.values()))
                    result["calibration"][name] = calibrate(
                        any_answerer, rows_by_half["tune"], mode, policy
                    )
                result["runs"][name] = run
                print(name, json.dumps(run.get("report", run.get("tune"))), flush=True)
            if order == defaults.order and args.warm:
                result["runs"][f"{model_name}/{order}/{headline}"]["warm"] = warm_timing(
                    answerers, rows_by_half, args.warm, headline
                )
    default = result["runs"].get(f"{args.models.split(',')[0]}/{defaults.order}/{headline}", {})
    report = default.get("report", {})
    result.update(
        {
            k: report.get(k)
            for k in (
                "short_answer_accuracy",
                "long_answer_token_recall",
                "citation_precision",
                "cited_answer_rate",
                "loop_rate",
                "unanswerable_decline_rate",
                "false_decline_rate",
            )
        }
    )
    result["median_answer_s_cold"] = report.get("median_answer_s")
    result["median_answer_s_warm"] = default.get("warm", {}).get("median_answer_s_warm")
    rel = result["runs"].get(f"{args.models.split(',')[0]}/relevance/{headline}", {}).get("report")
    if rel:
        result["relevance_order"] = rel
        deltas = [
            report[k] - rel[k]
            for k in ("short_answer_accuracy", "long_answer_token_recall")
            if report.get(k) is not None and rel.get(k) is not None
        ]
        result["cache_vs_relevance_points"] = round(100 * min(deltas), 2) if deltas else None
    path = write_results(args.out, result)
    (RESULTS / f"{args.out}_answers.jsonl").write_text(
        "".join(json.dumps(s) + "\n" for s in samples)
    )
    plot(result, RESULTS / f"{args.out}.png")
    print(f"wrote {path}")


def warm_timing(
    answerers: dict[str, Answerer], rows_by_half: dict[str, list[dict]], n: int, mode: str
) -> dict:
    """Ask `n` report-half questions again through `Answerer.ask` in the default mode: their
    prompts are in the KV cache from the first pass (whose time is the cold figure)."""
    rows = [r for r in rows_by_half.get("report", []) if r["kind"] != "unanswerable"][:n]
    cold, warm = [], []
    for r in rows:
        cold.append(
            r["generate_s"] if mode != "extract" and r["completion"] is not None else r["prepare_s"]
        )
        started = time.perf_counter()
        list(answerers[r["store"]].ask(r["question"], mode=mode))
        warm.append(time.perf_counter() - started)
    return {
        "questions": len(rows),
        "median_answer_s_cold": round(statistics.median(cold), 3) if cold else None,
        "median_answer_s_warm": round(statistics.median(warm), 3) if warm else None,
    }


if __name__ == "__main__":
    main()
