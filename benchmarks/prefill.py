"""Prefill speed with ragcache's CPU attention (ragcache.attention) against MLX's own, in one run.

For each embedded model and prompt length, the same prompt is prefilled in 512-token steps (as
the engine does) with the model's attention routed through `ragcache.attention` and through
mlx-lm's own `scaled_dot_product_attention`, interleaved, best of `--reps`. Also reported: how
far the last position's logits move (float32 rounding) and whether its greedy token is the same.

Writes benchmarks/results/prefill.json and prefill.png:
- `prefill_speedup`: prefill tok/s with ragcache's attention over MLX's, per model and length;
- `logits_max_abs_diff`, `argmax_same`.

    .venv/bin/python benchmarks/prefill.py [--lengths 512 1400 2048] [--reps 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ragcache  # noqa: E402,F401,I001  (optimized BLAS under MLX before mlx loads)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from benchmarks.common import RESULTS, machine, write_results  # noqa: E402
from ragcache import attention  # noqa: E402
from ragcache.model_loader import load_model  # noqa: E402
from ragcache.settings import load_settings  # noqa: E402

MODELS = ["smollm2-135m-instruct", "gemma3-270m"]
STEP = 512


def routed_layers(model: Any) -> list[tuple[Any, type, type]]:
    """Each routed layer with its routed class and mlx-lm's class under it."""
    routed = set(attention._ROUTED.values())
    return [(m, type(m), type(m).__mro__[1]) for m in model.modules() if type(m) in routed]


def use(layers: list[tuple[Any, type, type]], fast: bool) -> None:
    for layer, routed, original in layers:
        layer.__class__ = routed if fast else original


def prefill(model: Any, tokens: list[int]) -> tuple[float, np.ndarray]:
    cache = make_prompt_cache(model)
    start = time.perf_counter()
    for i in range(0, len(tokens), STEP):
        out = model(mx.array([tokens[i : i + STEP]]), cache=cache)
        mx.eval([c.state for c in cache])
    last = out[0, -1]
    mx.eval(last)
    return time.perf_counter() - start, np.array(last)


def measure(name: str, lengths: list[int], reps: int) -> list[dict[str, Any]]:
    loaded = load_model(name, load_settings().home)
    layers = routed_layers(loaded.model)
    if not layers:
        raise SystemExit(f"{name}: attention not routed ({attention.available()[1]})")
    rng = np.random.default_rng(0)
    vocab = min(int(loaded.model.args.vocab_size), 20000)
    rows = []
    for n in lengths:
        tokens = [1] + [int(t) for t in rng.integers(100, vocab, n - 1)]
        best = {True: float("inf"), False: float("inf")}
        last: dict[bool, np.ndarray] = {}
        prefill(loaded.model, tokens[:STEP])  # warm: trace and compile the fast path, allocate
        for _ in range(reps):
            for fast in (False, True):
                use(layers, fast)
                seconds, last[fast] = prefill(loaded.model, tokens)
                best[fast] = min(best[fast], seconds)
        use(layers, True)
        row = {
            "model": name,
            "prompt_tokens": n,
            "mlx_prefill_tps": round(n / best[False], 1),
            "ragcache_prefill_tps": round(n / best[True], 1),
            "prefill_speedup": round(best[False] / best[True], 3),
            "logits_max_abs_diff": float(np.abs(last[True] - last[False]).max()),
            "argmax_same": bool(last[True].argmax() == last[False].argmax()),
        }
        print(row, flush=True)
        rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = [f"{r['model'].split('-')[0]}\n{r['prompt_tokens']}" for r in rows]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["mlx_prefill_tps"] for r in rows], 0.4, label="MLX attention")
    ax.bar(x + 0.2, [r["ragcache_prefill_tps"] for r in rows], 0.4, label="ragcache attention")
    for i, r in enumerate(rows):
        ax.text(i + 0.2, r["ragcache_prefill_tps"], f"{r['prefill_speedup']:.2f}x", ha="center")
    ax.set_xticks(x, labels)
    ax.set_ylabel("prefill tok/s")
    ax.set_title("prefill in 512-token steps, CPU, float32")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1400, 2048])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=MODELS)
    args = parser.parse_args()
    rows = [row for name in args.models for row in measure(name, args.lengths, args.reps)]
    result = {
        "machine": machine(),
        "settings": vars(args),
        "attention": attention.available()[1],
        "rows": rows,
        "prefill_speedup": {
            f"{r['model']}/{r['prompt_tokens']}": r["prefill_speedup"] for r in rows
        },
    }
    write_results("prefill", result)
    plot(rows, RESULTS / "prefill.png")


if __name__ == "__main__":
    main()
