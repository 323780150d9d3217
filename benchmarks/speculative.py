"""Prompt-lookup speculation against plain greedy decoding, on RAG answers, in one run.

    .venv/bin/python benchmarks/speculative.py [--questions 8] [--max-tokens 128]

For each embedded model, the prompts are real RAG answer prompts (`/v1/ask`'s generate mode:
retrieved, ordered, the model family's template) for the first labelled python_docs questions.
Each prompt is decoded with speculation off and on, interleaved, through the same runtime (cold:
no prefix cache, so both pay the same prefill). Writes benchmarks/results/speculative.json:

- `decode_speedup`: decode tok/s with speculation over without (goal >= 2.0);
- `acceptance_rate`, `accepted_per_step`: draft tokens accepted, and tokens per verify step;
  `answers_drafting`: answers that drafted (the worker starts answers without drafts, but one in
  4, once drafting measured not paying on its recent answers for the model);
- `greedy_identical_rate`: answers identical token for token to plain greedy (goal 1.0);
- `batched_speedup`: total throughput (prefill included) of 8 answers submitted at once to the
  worker at batch 4 and 8, speculation on over off, runs ordered off, on, on, off (goal >= 1.0);
- `plain_decode_vs_floor`: plain decode tok/s over the weight-read floor (weight bytes / the
  best read rate measured here, before and after each model; goal >= 0.7), with the decode
  kernel (ragcache.skinny_gemm: its matmuls and its attention softmax product) and, as
  `plain_decode_vs_floor_before`, without it (OpenBLAS's matmuls, MLX's attention): the same
  prompts, interleaved, the tokens of both compared (`kernel_identical_rate`: the kernel's
  matmuls have OpenBLAS's bits, its attention is MLX's to ~1e-6, so a near tie could differ);
  the floor counts the float32 weights' bytes, as the issue defines it, though weights held as
  exact 4-bit codes (ragcache.q4_weights: SmolLM2's layers) are read at ~0.75 bytes each;
- `plain_decode_tps_float_copies` and `q4_identical_rate`: the same prompts, interleaved, decoded
  with every weight read from its float copy instead (as before ragcache.q4_weights), and whether
  the tokens are the same (they must be: the codes rebuild each weight bit for bit);
- `decode_step_parts_ms`: one decode step taken apart (output layer, the layers under it, the
  greedy pick and its read-back): kernel off (with MLX's attention), kernel on reading the
  weights row-major, kernel on reading them packed (the default, ragcache.packed_weights), and
  that with MLX's own rope instead of ragcache.rope_table's (`rope_mlx`), MLX's own norms instead
  of ragcache.compiled_norm's (`norms_mlx`), every weight read from its float copy instead of
  4-bit codes (`float_copies`) or with MLX's attention instead of the kernel's
  softmax product (`attention_mlx`); `step_screened` and
  `output_layer_screened`: the same as a greedy step of the worker takes them, the output layer
  screened (ragcache.output_screen; the plain and speculative runs above take it too);
- `decode_vs_llama_server`: ragcache's decode tok/s (the faster of plain and speculative) over
  llama.cpp's `llama-server` on the GGUF the embedded model was converted from (4-bit, read as it
  is), the same prompt tokens, same run, each prompt cold; llama-server at 1 and 2 threads
  (`-t N -tb N`), the faster taken (benchmarks/llama_server.py says where the binary comes from:
  `benchmarks/build_llama_server.sh` builds it for this CPU); null, with why, when none runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ragcache  # noqa: E402,F401,I001  (optimized BLAS under MLX before mlx loads)
import contextlib  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import RESULTS, machine, write_results  # noqa: E402
from benchmarks.llama_server import LlamaServer, LlamaServerUnavailable, find_binary  # noqa: E402
from benchmarks.quality import build_store  # noqa: E402
from ragcache import attention, compiled_norm, output_screen  # noqa: E402
from ragcache.answer import Answerer, AnswerSettings  # noqa: E402
from ragcache.blas import skinny_kernel  # noqa: E402
from ragcache.datasets import load_dataset  # noqa: E402
from ragcache.embedded_models import EMBEDDED_MODELS  # noqa: E402
from ragcache.embedder import SentenceTransformerEmbedder  # noqa: E402
from ragcache.engine import Completion, Engine  # noqa: E402
from ragcache.model_loader import load_model  # noqa: E402
from ragcache.output_screen import greedy_steps, routes  # noqa: E402
from ragcache.packed_weights import decode_weights, pack_model  # noqa: E402
from ragcache.retrieve import Retriever  # noqa: E402
from ragcache.rope_table import TableRoPE  # noqa: E402
from ragcache.runtime import ModelWorker, WorkerSettings  # noqa: E402
from ragcache.sampling import SamplingParams  # noqa: E402
from ragcache.segments import SegmentedPrompt  # noqa: E402
from ragcache.settings import load_settings, read_blas_settings  # noqa: E402
from ragcache.store import open_store  # noqa: E402

MODELS = ["smollm2-135m-instruct", "gemma3-270m"]


def read_rates_gbps() -> dict[str, float]:
    """Read rates measured here, best of 3 each: numpy's sum over 1 GiB (one thread), an MLX
    matrix-vector product over a 128 MiB matrix (what a decode step does), and the same product
    through the decode kernel's packed copy of the matrix (ragcache.packed_weights). The best of
    them is the floor's bandwidth: the floor must not be set by a slower reader than ragcache's."""
    a = np.ones(1 << 28, dtype=np.float32)
    a.sum()
    rates = {"numpy_sum": a.nbytes / min(_timed(a.sum) for _ in range(3)) / 1e9}
    del a
    w, v = mx.random.normal((4096, 8192)), mx.random.normal((1, 4096))
    mx.eval(w, v, v @ w)
    rates["mlx_matvec"] = w.nbytes / min(_timed(lambda: mx.eval(v @ w)) for _ in range(3)) / 1e9
    kernel = skinny_kernel()
    if kernel is not None:
        wt, vt = mx.random.normal((8192, 4096)), mx.random.normal((1, 4096))
        mx.eval(wt, vt)
        address = np.array(wt, copy=False).ctypes.data
        if kernel.pack(address, *wt.shape):
            try:
                mx.eval(vt @ wt.T)
                seconds = min(_timed(lambda: mx.eval(vt @ wt.T)) for _ in range(3))
                rates["packed_matvec"] = wt.nbytes / seconds / 1e9
            finally:
                kernel.unpack(address)
    return {k: round(x, 2) for k, x in rates.items()}


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def weight_bytes(model: Any) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def rag_prompts(name: str, n: int, home: Path) -> tuple[Any, list[SegmentedPrompt]]:
    loaded = load_model(name, home)
    retriever = Retriever(
        open_store(build_store("python_docs", home)), SentenceTransformerEmbedder()
    )
    answerer = Answerer(Engine(loaded), retriever, AnswerSettings())
    questions = load_dataset("python_docs").questions[:n]
    prompts = [answerer.prepare(q.question, mode="generate").prompt for q in questions]
    return loaded, prompts


@contextlib.contextmanager
def float_copies(loaded: Any) -> Iterator[bool]:
    """Decode with every weight read from its packed float copy, as before ragcache.q4_weights
    (yields whether any weight was held as 4-bit codes; if none, nothing changes)."""
    kernel = skinny_kernel()
    if kernel is None or loaded.packed is None or not loaded.packed.q4_matrices:
        yield False
        return
    pack_model(loaded.model, kernel, q4=False)
    output_screen.install(loaded.model, kernel)  # packing a weight again drops its screen
    try:
        yield True
    finally:
        pack_model(loaded.model, kernel, q4=True)
        output_screen.install(loaded.model, kernel)


@contextlib.contextmanager
def without_kernel(products: bool = True) -> Iterator[None]:
    """Decode as before the decode kernel: MLX's attention, and (`products`) OpenBLAS's
    matmuls."""
    kernel = skinny_kernel()
    if kernel is None:
        yield
        return
    attention.configure(read_blas_settings().fast_softmax, None)
    if products:
        kernel.set_enabled(False)
    try:
        yield
    finally:
        kernel.set_enabled(True)
        attention.configure(read_blas_settings().fast_softmax, kernel)


def step_parts_ms(loaded: Any, steps: int = 24) -> dict[str, dict[str, float]]:
    """One plain decode step at a 600-token context, taken apart, with the decode kernel off
    and on, and on with MLX's attention (`attention_mlx`), MLX's own rope (`rope_mlx`, instead
    of ragcache.rope_table's) or MLX's own norms (`norms_mlx`, instead of ragcache.compiled_norm's)
    instead of ragcache's: the whole
    step (forward, greedy pick, read-back of the token), the output layer alone, the layers
    under it alone, and the pick with its read-back. A single sequence's cache (int offsets);
    served decode goes through batch caches (array offsets), timed by `alone` below."""
    from mlx_lm.models.cache import make_prompt_cache

    net = loaded.model
    inner = getattr(net, "model", None) or net.language_model.model
    lm_head = getattr(net, "lm_head", None)
    head = lm_head if lm_head is not None else inner.embed_tokens.as_linear
    hidden = mx.random.normal((1, 1, net.args.hidden_size), key=mx.random.key(0))
    logits = mx.random.normal((1, net.args.vocab_size), key=mx.random.key(1))
    mx.eval(hidden, logits)

    def per_step_ms(fn: Any) -> float:
        for _ in range(3):
            fn()
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        return round((time.perf_counter() - t) / steps * 1000, 2)

    def measure() -> dict[str, float]:
        cache = make_prompt_cache(net)
        net(mx.array([[1, *range(100, 700)]]), cache=cache)
        mx.eval([c.state for c in cache])
        token = mx.array([[101]])

        def whole() -> None:
            nonlocal token
            token = mx.argmax(net(token, cache=cache)[:, -1, :], axis=-1, keepdims=True)
            token.item()

        def layers() -> None:
            mx.eval(inner(mx.array([[101]]), cache=cache))

        def screened(fn: Any) -> Any:  # as the worker's greedy steps run (ragcache.output_screen)
            def run() -> None:
                with greedy_steps():
                    fn()

            return run

        parts = {"step": per_step_ms(whole), "layers": per_step_ms(layers)}
        parts["output_layer"] = per_step_ms(lambda: mx.eval(head(hidden)))
        if routes(net):
            parts["step_screened"] = per_step_ms(screened(whole))
            parts["output_layer_screened"] = per_step_ms(screened(lambda: mx.eval(head(hidden))))
        parts["pick_and_read_back"] = per_step_ms(lambda: mx.argmax(logits, axis=-1).item())
        return parts

    kernel = skinny_kernel()
    out: dict[str, dict[str, float]] = {}
    if kernel is not None:
        with without_kernel():
            out["kernel_off"] = measure()
        with without_kernel(products=False):
            out["attention_mlx"] = measure()
        packed = kernel.packed_bytes()
        for w in decode_weights(net):  # the kernel reading the weights row-major
            kernel.unpack(np.array(w, copy=False).ctypes.data)
        try:
            out["kernel_on_row_major"] = measure()
        finally:
            if packed:
                pack_model(net, kernel, loaded.packed is not None and loaded.packed.q4_matrices > 0)
                output_screen.install(net, kernel)  # unpacking dropped the screen too
    out["kernel_on" if kernel is not None else "kernel_unavailable"] = measure()
    with float_copies(loaded) as changed:
        if changed:  # the same step with every weight read from its float copy
            out["float_copies"] = measure()
    routed = [m for m in net.modules() if isinstance(m, TableRoPE)]
    if routed:  # the same step with MLX's own rope (ragcache.rope_table off)
        for m in routed:
            m.__class__ = nn.RoPE
        try:
            out["rope_mlx"] = measure()
        finally:
            for m in routed:
                m.__class__ = TableRoPE
    compiled = {target: original for original, (target, _) in compiled_norm.ROUTES.items()}
    norms = [(m, type(m)) for m in net.modules() if type(m) in compiled]  # modules: unhashable
    if norms:  # the same step with MLX's own norms (ragcache.compiled_norm off)
        for m, cls in norms:
            m.__class__ = compiled[cls]
        try:
            out["norms_mlx"] = measure()
        finally:
            for m, cls in norms:
                m.__class__ = cls
    return out


def decode_tps(done: Completion) -> float:
    return done.stats.decode_tps


def alone(loaded: Any, prompts: list[SegmentedPrompt], max_tokens: int) -> dict[str, Any]:
    engine = Engine(loaded)
    plain_p = SamplingParams(max_tokens=max_tokens, speculation="off")
    spec_p = SamplingParams(max_tokens=max_tokens, speculation="lookup")
    engine.generate(prompts[0], SamplingParams(max_tokens=4))  # warm
    rows = []
    kernel = skinny_kernel()
    for prompt in prompts:
        plain = engine.generate(prompt, plain_p)
        spec = engine.generate(prompt, spec_p)
        before = plain  # without the decode kernel, when there is one to turn off
        if kernel is not None:
            with without_kernel():
                before = engine.generate(prompt, plain_p)
        floats = plain  # the weights read from float copies, when some are 4-bit codes
        with float_copies(loaded) as changed:
            if changed:
                floats = engine.generate(prompt, plain_p)
        rows.append(
            {
                "prompt_tokens": len(prompt.tokens),
                "generated": plain.stats.generated_tokens,  # decoded, before a loop's trim
                "spec_generated": spec.stats.generated_tokens,
                "identical": plain.tokens == spec.tokens,
                "plain_decode_s": plain.stats.decode_s,
                "before_decode_s": before.stats.decode_s,
                "before_generated": before.stats.generated_tokens,
                "kernel_identical": before.tokens == plain.tokens,
                "float_copies_decode_s": floats.stats.decode_s,
                "float_copies_generated": floats.stats.generated_tokens,
                "q4_identical": floats.tokens == plain.tokens,
                "spec_decode_s": spec.stats.decode_s,
                "plain_tps": round(decode_tps(plain), 2),
                "spec_tps": round(decode_tps(spec), 2),
                "drafted": spec.stats.drafted_tokens,
                "accepted": spec.stats.accepted_tokens,
                "steps": spec.stats.decode_steps,
                "first_divergence": _divergence(plain.tokens, spec.tokens),
                "finish": [plain.stats.finish_reason, spec.stats.finish_reason],
            }
        )
    engine.close()
    plain_tokens = sum(max(0, r["generated"] - 1) for r in rows)
    spec_tokens = sum(max(0, r["spec_generated"] - 1) for r in rows)
    plain_s = sum(r["plain_decode_s"] for r in rows)
    before_tokens = sum(max(0, r["before_generated"] - 1) for r in rows)
    before_s = sum(r["before_decode_s"] for r in rows)
    floats_tokens = sum(max(0, r["float_copies_generated"] - 1) for r in rows)
    floats_s = sum(r["float_copies_decode_s"] for r in rows)
    spec_s = sum(r["spec_decode_s"] for r in rows)
    drafted, accepted = sum(r["drafted"] for r in rows), sum(r["accepted"] for r in rows)
    steps = sum(r["steps"] for r in rows)
    spec_decoded = sum(r["steps"] + r["accepted"] for r in rows)  # each step: its accepted + 1
    return {
        "plain_decode_tps": round(plain_tokens / plain_s, 2) if plain_s else 0.0,
        "plain_decode_tps_before": round(before_tokens / before_s, 2) if before_s else 0.0,
        "kernel_identical_rate": round(sum(r["kernel_identical"] for r in rows) / len(rows), 3),
        "plain_decode_tps_float_copies": round(floats_tokens / floats_s, 2) if floats_s else 0.0,
        "q4_identical_rate": round(sum(r["q4_identical"] for r in rows) / len(rows), 3),
        "spec_decode_tps": round(spec_tokens / spec_s, 2) if spec_s else 0.0,
        "decode_speedup": round(plain_s / spec_s, 3) if spec_s else 0.0,
        "acceptance_rate": round(accepted / drafted, 3) if drafted else 0.0,
        "accepted_per_step": round(accepted / steps, 3) if steps else 0.0,
        "tokens_per_step": round(spec_decoded / steps, 3) if steps else 0.0,
        "greedy_identical_rate": round(sum(r["identical"] for r in rows) / len(rows), 3),
        "answers": len(rows),
        # Answers that drafted at all: the worker stops starting answers on drafts (but one in
        # LookupSettings.probe_every) once its record says drafting does not pay for the model;
        # acceptance and tokens per step describe those answers only.
        "answers_drafting": sum(1 for r in rows if r["drafted"]),
        "rows": rows,
    }


def _divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def batched(loaded: Any, prompts: list[SegmentedPrompt], max_tokens: int, batch: int) -> dict:
    """All prompts submitted at once to a worker of `batch` slots, speculation off and on, in the
    order off, on, on, off, twice (a drift of the machine's speed over the runs cancels out of
    the ratio; one round of four measured 0.83-1.11 here with identical tokens and a few dozen
    drafted tokens either way: noise of this shared machine). With speculation on, a request
    speculates alone only while nothing else decodes: the last one left when the others have
    finished."""
    out: dict[str, dict[str, Any]] = {
        m: {"tokens": 0, "seconds": 0.0, "drafted": 0, "accepted": 0} for m in ("off", "lookup")
    }
    answers = []
    for mode in ("off", "lookup", "lookup", "off") * 2:
        engine = Engine(loaded)
        worker = ModelWorker(engine, WorkerSettings(max_batch=batch)).start()
        params = SamplingParams(max_tokens=max_tokens, speculation=mode)
        t = time.perf_counter()
        tickets = [worker.submit(p, params) for p in prompts]
        done = [
            next(e for e in tk.events(timeout=1800) if isinstance(e, Completion)) for tk in tickets
        ]
        seconds = time.perf_counter() - t
        worker.stop()
        o = out[mode]
        o["tokens"] += sum(len(d.tokens) for d in done)
        o["seconds"] += seconds
        o["drafted"] += sum(d.stats.drafted_tokens for d in done)
        o["accepted"] += sum(d.stats.accepted_tokens for d in done)
        answers.append([d.tokens for d in done])
    rate = {m: o["tokens"] / o["seconds"] for m, o in out.items()}
    return {
        "batched_speedup": round(rate["lookup"] / rate["off"], 3),
        "identical": all(a == answers[0] for a in answers),  # all eight runs
        "off_tokens_per_s": round(rate["off"], 2),
        "lookup_tokens_per_s": round(rate["lookup"], 2),
        "lookup_drafted": out["lookup"]["drafted"],
        "lookup_accepted": out["lookup"]["accepted"],
        "seconds": round(sum(o["seconds"] for o in out.values()), 1),
    }


def llama_server_tps(
    name: str, prompts: list[SegmentedPrompt], max_tokens: int, home: Path
) -> dict[str, Any]:
    """llama-server's greedy decode tok/s on the same prompt tokens, at 1 and 2 threads (the
    machine is otherwise idle while it runs), each prompt cold (`cache_prompt` off, as ragcache's
    runs here). `tps` is the faster of the two; None, with `why`, when no llama-server runs here."""
    gguf = EMBEDDED_MODELS[name].locate(home / "sources")
    try:
        binary = find_binary(home)
        out: dict[str, Any] = {"origin": binary.origin, "version": binary.version()}
        for threads in (1, 2):
            log = RESULTS.parent / ".work" / f"llama-server-{name}-t{threads}.log"
            with LlamaServer(binary, gguf, log, threads=threads) as server:
                server.complete(list(prompts[0].tokens), 8, cache_prompt=False)  # warm up
                tokens = seconds = 0.0
                for p in prompts:
                    timings = server.complete(list(p.tokens), max_tokens, False)["timings"]
                    if timings.get("predicted_n", 0) > 1:
                        tokens += timings["predicted_n"]
                        seconds += timings["predicted_ms"] / 1000
            out[f"tps_t{threads}"] = round(tokens / seconds, 2) if seconds else None
    except LlamaServerUnavailable as exc:
        return {"tps": None, "why": str(exc)}
    out["tps"] = max(out["tps_t1"] or 0, out["tps_t2"] or 0) or None
    return out


def plot(result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ax = axes[0]
    x = np.arange(len(models))
    plain = [result["models"][m]["plain_decode_tps"] for m in models]
    before = [result["models"][m].get("plain_decode_tps_before", 0) for m in models]
    spec = [result["models"][m]["spec_decode_tps"] for m in models]
    floor = [result["models"][m]["floor_tps"] for m in models]
    llama = [result["models"][m].get("llama_server_tps") or 0 for m in models]
    floats = [result["models"][m].get("plain_decode_tps_float_copies", 0) for m in models]
    w = 0.14
    ax.bar(x - 2.5 * w, before, w, label="plain, OpenBLAS and MLX attention")
    ax.bar(x - 1.5 * w, floats, w, label="plain, decode kernel, float copies")
    ax.bar(x - 0.5 * w, plain, w, label="plain, decode kernel (4-bit codes where exact)")
    ax.bar(x + 0.5 * w, spec, w, label="prompt lookup")
    ax.bar(x + 1.5 * w, llama, w, label="llama-server (Q4 GGUF)")
    ax.bar(x + 2.5 * w, floor, w, label="float32 weight-read floor", color="grey")
    ax.set_xticks(x, models)
    ax.set_ylabel("decode tokens/s")
    ax.set_ylim(0, 1.8 * max(before + floats + plain + spec + llama + floor))  # room for the legend
    ax.legend(fontsize=7, ncol=2, loc="upper center")
    ax = axes[1]
    labels = []
    values = []
    for m in models:
        for b, v in result["models"][m].get("batched", {}).items():
            labels.append(f"{m.split('-')[0]} b{b}")
            values.append(v["batched_speedup"])
    ax.bar(labels, values, color="tab:green")
    ax.axhline(1.0, color="tab:red", ls="--")
    ax.set_title("batched: speculation on / off")
    fig.tight_layout()
    fig.savefig(RESULTS / "speculative.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--batched-model", default=MODELS[0])
    args = parser.parse_args()
    home = load_settings().home
    # The read rates are measured before and after each model's decoding, and the floor uses the
    # best of all: on a shared machine one measurement can land in a slow moment (seen: numpy's
    # sum at 15.5 GB/s in one run, 25 in another), which would set the floor below what decoding
    # then reached.
    samples = [read_rates_gbps()]
    result: dict[str, Any] = {"machine": machine()}
    result["models"] = {}
    for name in args.models:
        t = time.monotonic()
        loaded, prompts = rag_prompts(name, args.questions, home)
        part = alone(loaded, prompts, args.max_tokens)
        part["weight_bytes"] = weight_bytes(loaded.model)
        samples.append(read_rates_gbps())
        part["decode_step_parts_ms"] = step_parts_ms(loaded)
        if name == args.batched_model:
            part["batched"] = {str(b): batched(loaded, prompts, args.max_tokens, b) for b in (4, 8)}
        part["llama_server"] = llama_server_tps(name, prompts, args.max_tokens, home)
        part["llama_server_tps"] = part["llama_server"]["tps"]
        best = max(part["plain_decode_tps"], part["spec_decode_tps"])
        server = part["llama_server_tps"]
        part["decode_vs_llama_server"] = round(best / server, 3) if server else None
        result["models"][name] = part
        mx.clear_cache()
        print(f"{name}: {time.monotonic() - t:.0f} s", flush=True)
    bandwidth = max(max(rates.values()) for rates in samples)
    result["read_bandwidth_gbps"] = round(bandwidth, 2)
    result["read_rates_gbps"] = samples
    for part in result["models"].values():
        part["floor_tps"] = round(bandwidth * 1e9 / part["weight_bytes"], 2)
        part["plain_decode_vs_floor"] = round(part["plain_decode_tps"] / part["floor_tps"], 3)
        part["plain_decode_vs_floor_before"] = round(
            part["plain_decode_tps_before"] / part["floor_tps"], 3
        )
    default = result["models"][args.models[0]]
    for key in (
        "decode_speedup",
        "acceptance_rate",
        "accepted_per_step",
        "tokens_per_step",
        "greedy_identical_rate",
        "plain_decode_vs_floor",
        "plain_decode_vs_floor_before",
        "kernel_identical_rate",
        "q4_identical_rate",
        "decode_vs_llama_server",
    ):
        result[key] = default[key]
    batches = default.get("batched", {})
    result["batched_speedup"] = min((v["batched_speedup"] for v in batches.values()), default=None)
    result["default_model"] = args.models[0]
    write_results("speculative", result)
    plot(result)
    summary = {k: v for k, v in result.items() if k not in ("machine", "models")}
    print(json.dumps(summary, indent=1))
    for name, part in result["models"].items():
        keep = {k: v for k, v in part.items() if k != "rows"}
        print(name, json.dumps(keep))
        print(
            " per answer tps plain/spec:", [(r["plain_tps"], r["spec_tps"]) for r in part["rows"]]
        )


if __name__ == "__main__":
    main()
