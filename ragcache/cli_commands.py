"""The core subcommands: `model`, `doctor`, `generate`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragcache.answer_policy import ANSWER_MODES
from ragcache.embedded_models import DEFAULT_MODEL, DEFAULT_SETUP_MODELS, EMBEDDED_MODELS
from ragcache.model_prepare import QUANT_MODES, is_complete, prepare_model, prepared_path
from ragcache.order import ORDERS
from ragcache.settings import GenerationSettings, Settings

if TYPE_CHECKING:
    from ragcache.answer import AnswerDone


NO_SPECULATE_HELP = (
    "decode one token per step (default: greedy decoding drafts from the prompt and verifies "
    "the draft in one pass; the tokens are the same)"
)


CHUNK_REUSE_HELP = (
    "epic: copy the KV of chunks computed in earlier prompts, recomputing each chunk's first "
    "tokens (faster prefill, answers close to but not the same as exact); off: exact prefix "
    "reuse only (default: RAGCACHE_CHUNK_REUSE, else off)"
)


def chunk_reuse(args: Any, gen: GenerationSettings) -> str:
    """The chunk reuse mode: --chunk-reuse, else the setting (RAGCACHE_CHUNK_REUSE)."""
    return getattr(args, "chunk_reuse", None) or gen.chunk_reuse


def speculation(args: Any, gen: GenerationSettings) -> str:
    """The speculation mode: off with --no-speculate, else the setting (RAGCACHE_SPECULATION)."""
    return "off" if getattr(args, "no_speculate", False) else gen.speculation


def register(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="prepare and list the embedded models")
    model_sub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    prep = model_sub.add_parser(
        "prepare",
        help="convert an embedded GGUF to an MLX folder (once; later runs return at once)",
    )
    prep.add_argument("name", nargs="?", default=None, help=f"default: {DEFAULT_MODEL}")
    prep.add_argument(
        "--all", action="store_true", help="prepare the models the set-up script installs"
    )
    prep.add_argument("--quant", choices=list(QUANT_MODES), default=None)
    prep.set_defaults(func=cmd_model_prepare)
    lst = model_sub.add_parser("list", help="embedded models and whether they are prepared")
    lst.set_defaults(func=cmd_model_list)

    doctor = sub.add_parser("doctor", help="check BLAS speed, model and memory; say how to fix")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(func=cmd_doctor)

    gen = sub.add_parser("generate", help="stream a completion from the generator (debugging)")
    gen.add_argument("prompt", help="the prompt text; '-' reads standard input")
    gen.add_argument("--model", default=None, help="embedded name, model folder or hub id")
    gen.add_argument("--quant", choices=list(QUANT_MODES), default=None)
    gen.add_argument("--system", default=None, help="system prompt (chat models)")
    gen.add_argument("--raw", action="store_true", help="no chat template, even for chat models")
    gen.add_argument("--max-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--json", action="store_true", help="print one JSON object at the end")
    gen.add_argument("--no-speculate", action="store_true", help=NO_SPECULATE_HELP)
    gen.add_argument("--chunk-reuse", choices=("off", "epic"), help=CHUNK_REUSE_HELP)
    gen.set_defaults(func=cmd_generate)

    ask = sub.add_parser("ask", help="answer a question from the store, with cited sources")
    ask.add_argument("question", help="the question; '-' reads it from standard input")
    ask.add_argument(
        "--db",
        default=None,
        help="LanceDB folder or object-store URI (s3://bucket/prefix, gs://, az://; default: HOME/db)",
    )
    ask.add_argument("--table", default="chunks")
    ask.add_argument("--k", type=int, default=None, help="chunks to retrieve (default 5)")
    ask.add_argument("--order", choices=list(ORDERS), default="cache")
    ask.add_argument(
        "--mode",
        choices=list(ANSWER_MODES),
        default=None,
        help="extract (default): quote the passage that answers; generate: the model's answer, "
        "checked against the sources; auto: the model's answer when the sources support it, "
        "else the quote",
    )
    ask.add_argument(
        "--stream", action="store_true", help="also show the model's raw text as it is generated"
    )
    ask.add_argument(
        "--where", default=None, help="SQL filter on chunk columns, e.g. \"source LIKE '%%faq%%'\""
    )
    ask.add_argument("--model", default=None)
    ask.add_argument("--max-tokens", type=int, default=None)
    ask.add_argument("--no-cache", action="store_true", help="compute every prompt from scratch")
    ask.add_argument(
        "--cache-dir", type=Path, default=None, help="KV cache disk tier (default: HOME/kv)"
    )
    ask.add_argument(
        "--interactive",
        "-i",
        action="store_true",
        help="then read follow-up questions from standard input, one per line",
    )
    ask.add_argument("--json", action="store_true", help="one JSON object per answer")
    ask.add_argument("--no-speculate", action="store_true", help=NO_SPECULATE_HELP)
    ask.add_argument("--chunk-reuse", choices=("off", "epic"), help=CHUNK_REUSE_HELP)
    ask.set_defaults(func=cmd_ask)

    from ragcache.batch.cli import register as register_batch

    register_batch(sub)


def cmd_model_prepare(args: argparse.Namespace, settings: Settings) -> int:
    names = list(DEFAULT_SETUP_MODELS) if args.all else [args.name or settings.model.name]
    quant = args.quant or settings.model.quant
    for name in names:
        prepared = prepare_model(name, settings.home, quant)
        took = f"prepared in {prepared.seconds:.0f} s" if prepared.seconds else "already prepared"
        print(f"{name} [{quant}] -> {prepared.path} ({took})")
    return 0


def cmd_model_list(args: argparse.Namespace, settings: Settings) -> int:
    for name, spec in EMBEDDED_MODELS.items():
        ready = [q for q in QUANT_MODES if is_complete(prepared_path(settings.home, name, q))]
        mark = "*" if name == settings.model.name else " "
        print(f"{mark} {name:28} {spec.description}; prepared: {', '.join(ready) or 'no'}")
    return 0


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    from ragcache.doctor import format_report, run_doctor

    report = run_doctor(settings)
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_report(report))
    return 1 if report.problems else 0


def cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    from ragcache.engine import Completion, Engine
    from ragcache.model_loader import load_model
    from ragcache.sampling import SamplingParams
    from ragcache.segments import Message, encode_chat, encode_segments

    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    gen = settings.generation
    loaded = load_model(
        args.model or settings.model.name, settings.home, args.quant or settings.model.quant
    )
    if loaded.chat and not args.raw:
        messages = ([Message("system", (args.system,))] if args.system else []) + [
            Message("user", (text,))
        ]
        prompt = encode_chat(loaded.tokenizer, messages)
    else:
        prompt = encode_segments(loaded.tokenizer, [text])
    params = SamplingParams(
        max_tokens=args.max_tokens or gen.max_tokens,
        temperature=gen.temperature if args.temperature is None else args.temperature,
        top_p=gen.top_p if args.top_p is None else args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
        speculation=speculation(args, gen),
        chunk_reuse=chunk_reuse(args, gen),
    )
    engine = Engine(loaded, gen)
    for event in engine.stream(prompt, params):
        if isinstance(event, Completion):
            if args.json:
                print(json.dumps({"text": event.text, **event.stats.as_dict()}))
            else:
                s = event.stats
                print(
                    f"\n[{s.prompt_tokens} prompt tokens, ttft {s.ttft_s:.2f} s, "
                    f"prefill {s.prefill_tps:.0f} tok/s, decode {s.decode_tps:.1f} tok/s, "
                    f"{s.generated_tokens} tokens ({s.accepted_tokens} of {s.drafted_tokens} "
                    f"drafted accepted), {s.finish_reason}]",
                    file=sys.stderr,
                )
        elif not args.json:
            print(event.text, end="", flush=True)
    return 0


def cmd_ask(args: argparse.Namespace, settings: Settings) -> int:
    from ragcache.answer import AnswerDone, Conversation, SourcesEvent
    from ragcache.sampling import SamplingParams
    from ragcache.stack import StackOptions, build_stack

    question = sys.stdin.readline().strip() if args.question == "-" else args.question
    stack = build_stack(
        settings,
        StackOptions(
            db_dir=args.db,
            table=args.table,
            model=args.model,
            cache=not args.no_cache,
            cache_dir=args.cache_dir,
        ),
    )
    conversation = Conversation()
    max_tokens = args.max_tokens or stack.answerer.settings.max_tokens
    params = SamplingParams(
        max_tokens=max_tokens,
        speculation=speculation(args, settings.generation),
        chunk_reuse=chunk_reuse(args, settings.generation),
    )
    try:
        while question:
            for event in stack.answerer.ask(
                question, args.k, args.order, params, args.where, conversation, mode=args.mode
            ):
                if isinstance(event, AnswerDone):
                    if args.json:
                        print(json.dumps(_answer_json(question, event)), flush=True)
                    else:
                        _print_answer(event, streamed=args.stream)
                elif isinstance(event, SourcesEvent) or args.json:
                    continue
                elif args.stream:
                    print(event.text, end="", file=sys.stderr, flush=True)
            question = sys.stdin.readline().strip() if args.interactive else ""
    finally:
        stack.close()
    return 0


def _print_answer(done: AnswerDone, streamed: bool) -> None:
    """The checked answer, then each citation's quote, then the sources (cited ones starred)."""
    if streamed:
        print(file=sys.stderr)
    print(done.text)
    if done.quotes:
        print()
    for c in done.quotes:
        quote = " ".join(c.quote.text.split())
        print(f"  [{c.source.number}] \u201c{quote}\u201d")
    print()
    for s in done.sources:
        mark = "*" if s in done.citations else " "
        where = " > ".join(s.heading_path)
        print(f"{mark}[{s.number}] {s.source}{' > ' + where if where else ''}  ({s.chunk_id})")
    f = done.figures
    drafts = (
        f", {f.accepted_tokens}/{f.drafted_tokens} drafted accepted" if f.drafted_tokens else ""
    )
    print(
        f"[{done.method}, retrieval {f.retrieval_ms:.0f} ms, prompt {f.prompt_tokens} tokens "
        f"({f.cached_tokens} cached, {f.recomputed_tokens} computed), ttft "
        f"{f.ttft_s:.2f} s, {f.decode_tps:.1f} tok/s{drafts}, {f.finish_reason}, "
        f"{f.total_s:.2f} s]",
        file=sys.stderr,
    )


def _answer_json(question: str, done: AnswerDone) -> dict:
    return {
        "question": question,
        "answer": done.text,
        "method": done.method,
        "confidence": done.confidence,
        "citations": [s.number for s in done.citations],
        "quotes": [c.as_dict() for c in done.quotes],
        "model_text": done.completion.text,
        "sources": [s.as_dict() for s in done.sources],
        "figures": done.figures.__dict__,
    }
