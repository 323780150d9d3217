"""Generation engine vs raw mlx-lm, BLAS speed, and the quantization table.

Writes benchmarks/results/generation.json and generation.png. Every ratio is ours / raw measured
in this run, with the two interleaved so drift on a shared machine hits both alike.

    .venv/bin/python benchmarks/generation.py [--lengths 512 1024 2048] [--decode 32] [--reps 2]
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ragcache  # noqa: E402,F401,I001  (optimized BLAS under MLX before mlx loads)
import mlx.core as mx  # noqa: E402
from mlx_lm import stream_generate  # noqa: E402

from benchmarks.common import RESULTS, machine, median, write_results  # noqa: E402
from ragcache.doctor import measure_gemm_gflops  # noqa: E402
from ragcache.engine import Completion, Engine  # noqa: E402
from ragcache.model_loader import LoadedModel, load_model  # noqa: E402
from ragcache.model_prepare import prepare_model  # noqa: E402
from ragcache.sampling import SamplingParams  # noqa: E402
from ragcache.segments import SegmentedPrompt  # noqa: E402
from ragcache.settings import load_settings  # noqa: E402

MODELS = ["smollm2-135m-instruct", "gemma3-270m"]
QUANTS = ["none", "affine4", "mxfp4", "nvfp4"]


def held_out_text() -> str:
    """Standard-library documentation (PSF licence): on every machine, never seen by our tuning."""
    import argparse as a
    import collections as c
    import json as j
    import pathlib as p

    docs = [inspect.getdoc(m) or "" for m in (j, a, c, p)]
    docs += [inspect.getdoc(getattr(c, n)) or "" for n in ("OrderedDict", "Counter", "deque")]
    return "\n\n".join(docs)


def prompt_of(loaded: LoadedModel, n_tokens: int) -> list[int]:
    ids = loaded.tokenizer.encode(held_out_text())
    while len(ids) < n_tokens:
        ids = ids + ids
    return ids[:n_tokens]


def run_raw(loaded: LoadedModel, tokens: list[int], n_decode: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    first = last = 0.0
    n = 0
    for _ in stream_generate(loaded.model, loaded.tokenizer, tokens, max_tokens=n_decode):
        now = time.perf_counter()
        first = first or now
        last = now
        n += 1
    return first - start, last - first, n


def run_ours(engine: Engine, tokens: list[int], n_decode: int) -> tuple[float, float, int]:
    """(time to first token, decode time after it, tokens generated), from the engine's own
    clock: text events undercount tokens, since the detokenizer holds some back."""
    prompt = SegmentedPrompt(tokens, [len(tokens)])
    for event in engine.stream(prompt, SamplingParams(max_tokens=n_decode)):
        if isinstance(event, Completion):
            s = event.stats
            return s.ttft_s, s.decode_s, s.generated_tokens
    raise AssertionError("no completion")


def compare(loaded: LoadedModel, lengths: list[int], n_decode: int, reps: int) -> list[dict]:
    engine = Engine(loaded)
    rows = []
    run_ours(engine, prompt_of(loaded, 64), 4)  # warm both paths up
    run_raw(loaded, prompt_of(loaded, 64), 4)
    for n in lengths:
        tokens = prompt_of(loaded, n)
        samples: dict[str, list[tuple[float, float, int]]] = {"raw": [], "ours": []}
        for _ in range(reps):
            samples["raw"].append(run_raw(loaded, tokens, n_decode))
            samples["ours"].append(run_ours(engine, tokens, n_decode))
        row = {"model": loaded.name, "prompt_tokens": n}
        for who, runs in samples.items():
            prefill = median([n / t for t, _, _ in runs])
            decode = median([(k - 1) / d for _, d, k in runs if k > 1 and d > 0])
            row[f"{who}_prefill_tps"] = round(prefill, 1)
            row[f"{who}_decode_tps"] = round(decode, 2)
        row["prefill_ratio"] = round(row["ours_prefill_tps"] / row["raw_prefill_tps"], 3)
        row["decode_ratio"] = round(row["ours_decode_tps"] / row["raw_decode_tps"], 3)
        print(row, flush=True)
        rows.append(row)
    return rows


def perplexity(loaded: LoadedModel, n_tokens: int = 512) -> float:
    ids = loaded.tokenizer.encode(held_out_text())[-n_tokens:]
    x = mx.array(ids)[None]
    logits = loaded.model(x[:, :-1]).astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logprobs, x[:, 1:, None], axis=-1)
    return math.exp(-picked.mean().item())


def quant_table(model: str, n_prompt: int, n_decode: int) -> list[dict]:
    settings = load_settings()
    rows = []
    for quant in QUANTS:
        prepared = prepare_model(model, settings.home, quant)
        loaded = load_model(model, settings.home, quant)
        size = sum(f.stat().st_size for f in Path(prepared.path).glob("*.safetensors"))
        engine = Engine(loaded)
        tokens = prompt_of(loaded, n_prompt)
        run_ours(engine, tokens[:32], 2)
        ttft, decode_s, k = run_ours(engine, tokens, n_decode)
        row = {
            "quant": quant,
            "size_mb": round(size / 2**20, 1),
            "perplexity": round(perplexity(loaded), 3),
            "prefill_tps": round(n_prompt / ttft, 1),
            "decode_tps": round((k - 1) / decode_s, 2) if k > 1 else 0.0,
        }
        print(row, flush=True)
        rows.append(row)
        del engine, loaded
        mx.clear_cache()
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    rows = result["engine_vs_raw"]
    labels = [f"{r['model'].split('-')[0]}\n{r['prompt_tokens']}" for r in rows]
    x = range(len(rows))
    for ax, key, title in (
        (axes[0], "prefill", "prefill tok/s"),
        (axes[1], "decode", "decode tok/s"),
    ):
        ax.bar([i - 0.2 for i in x], [r[f"raw_{key}_tps"] for r in rows], 0.4, label="mlx-lm raw")
        ax.bar([i + 0.2 for i in x], [r[f"ours_{key}_tps"] for r in rows], 0.4, label="ragcache")
        ax.set_xticks(list(x), labels)
        ax.set_title(f"{title} (ratio goal >= 0.95)")
        ax.legend()
    q = result["quantization"]
    ax = axes[2]
    ax.bar([r["quant"] for r in q], [r["perplexity"] for r in q], color="tab:green")
    for i, r in enumerate(q):
        ax.text(
            i,
            r["perplexity"],
            f"{r['size_mb']:.0f} MB\n{r['prefill_tps']:.0f}/{r['decode_tps']:.1f} tok/s",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_title(f"{result['quantization_model']}: perplexity (size, prefill/decode)")
    fig.suptitle(
        f"generation on {result['machine']['platform']}, BLAS {result['blas_gflops']} GFLOP/s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--quant-model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--quant-only", action="store_true", help="redo the quantization table, keep the rest"
    )
    args = parser.parse_args()

    settings = load_settings()
    if args.quant_only:
        result = json.loads((RESULTS / "generation.json").read_text())
        result["quantization"] = quant_table(args.quant_model, 256, 16)
        result["quantization_measured"] = machine()
        finish(result)
        return
    result: dict = {"machine": machine(), "settings": vars(args)}
    result["blas_gflops"] = round(median([measure_gemm_gflops() for _ in range(3)]), 1)
    print("blas_gflops", result["blas_gflops"], flush=True)
    rows = []
    for name in MODELS:
        loaded = load_model(name, settings.home)
        rows += compare(loaded, args.lengths, args.decode, args.reps)
        del loaded
        mx.clear_cache()
    result["engine_vs_raw"] = rows
    # The goal holds for every row, so report the worst one.
    result["prefill_ratio"] = min(r["prefill_ratio"] for r in rows)
    result["decode_ratio"] = min(r["decode_ratio"] for r in rows)
    result["quantization_model"] = args.quant_model
    result["quantization"] = quant_table(args.quant_model, 256, 16)
    finish(result)


def finish(result: dict) -> None:
    rows = result["engine_vs_raw"]
    result["prefill_ratio_median"] = round(median([r["prefill_ratio"] for r in rows]), 3)
    result["decode_ratio_median"] = round(median([r["decode_ratio"] for r in rows]), 3)
    by_quant = {r["quant"]: r for r in result["quantization"]}
    result["nvfp4_ppl_ratio"] = round(
        by_quant["nvfp4"]["perplexity"] / by_quant["none"]["perplexity"], 4
    )
    result["goals"] = {
        "prefill_ratio>=0.95": result["prefill_ratio"] >= 0.95,
        "decode_ratio>=0.95": result["decode_ratio"] >= 0.95,
        "blas_gflops>=100": result["blas_gflops"] >= 100,
        "nvfp4_ppl_ratio<=1.05": result["nvfp4_ppl_ratio"] <= 1.05,
    }
    print(write_results("generation", result))
    plot(result, Path(__file__).resolve().parent / "results" / "generation.png")


if __name__ == "__main__":
    main()
