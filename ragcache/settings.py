"""Settings of every component, and the one place that reads the environment.

Each component has a frozen dataclass with defaults; `Settings` gathers them. `load_settings` reads
`RAGCACHE_*` variables and rejects unknown ones, so a typo fails loudly instead of being ignored.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ragcache.errors import ConfigError

ENV_PREFIX = "RAGCACHE_"


def default_home(environ: Mapping[str, str] = os.environ) -> Path:
    """Where prepared models, caches and the default store live: $RAGCACHE_HOME or the user cache."""
    if environ.get("RAGCACHE_HOME"):
        return Path(environ["RAGCACHE_HOME"]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "ragcache"
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ragcache"


@dataclass(frozen=True)
class BlasSettings:
    # "auto": load an optimized BLAS into the process on Linux; "reference": keep the wheel's own.
    mode: str = "auto"
    # Explicit library path; empty means search the usual system locations.
    library: str = ""
    # Decode steps' one-row matmuls through ragcache's own kernel (ragcache/skinny_gemm.py),
    # bit-identical to OpenBLAS's sgemm and ~2x faster on them; off: every matmul is OpenBLAS's.
    skinny_gemm: bool = True
    # That kernel reads each float32 weight of a loaded model from a packed copy
    # (ragcache/packed_weights.py): ~3x its row-major read rate, for a second copy of the weights.
    packed_weights: bool = True
    # A weight that is exactly 4-bit codes (dequantized from a GGUF's Q4_1 blocks: SmolLM2's
    # layers) is packed as those codes (ragcache/q4_weights.py): a fifth of the bytes for decode
    # steps to read, the same bits; off: packed float copies for every weight.
    q4_weights: bool = True
    # Prefill attention's softmax with a vectorized exp on CPU (ragcache/attention.py): MLX's own
    # exp is scalar there and took ~60% of a long prefill; off: MLX's attention for prefill.
    fast_softmax: bool = True
    # Decode steps', batches' and verifies' attention through that kernel: softmax and the
    # product with the values in one native call (ragcache/attention.py); off: MLX's attention.
    decode_attention: bool = True
    # Rotary embeddings from tables of their cos and sin, bit for bit MLX's (ragcache/rope_table.py):
    # MLX's CPU rope recomputes them in ~20 small ops per call; off: MLX's rope, unchanged.
    rope_tables: bool = True
    # Greedy decode steps score the vocabulary from an 8-bit copy of the output layer and compute
    # exactly only the words that can be the argmax: the same tokens, a quarter of that layer's
    # bytes read (ragcache/output_screen.py), for that copy's memory; off: every logit computed.
    output_screen: bool = True
    # RMS norms of decode steps, batches and verifies as one compiled MLX call, bit for bit
    # MLX's eleven-node fallback (ragcache/compiled_norm.py); off: MLX's norm, unchanged.
    compiled_norms: bool = True


@dataclass(frozen=True)
class ModelSettings:
    # An embedded model name, an mlx-lm model folder, or a hub id.
    name: str = "smollm2-135m-instruct"
    # Quantization of embedded models: float32 is the fast path on CPU.
    quant: str = "none"


@dataclass(frozen=True)
class GenerationSettings:
    # Tokens per prefill step: bounds peak activation memory on long prompts.
    prefill_step_size: int = 512
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    # "lookup": greedy decoding drafts from the prompt and checks the draft in one pass (the same
    # tokens, fewer steps; ragcache.runtime.speculate); "off": one token per step.
    speculation: str = "lookup"
    # "epic": copy the K/V of chunks computed in earlier prompts into this one, recomputing each
    # chunk's first tokens (ragcache.cache.chunk_kv; close to, not the same as, computing the
    # prompt: off by default); "off": exact prefix reuse only.
    chunk_reuse: str = "off"


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=default_home)
    blas: BlasSettings = field(default_factory=BlasSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)


# Environment variable -> (section, field). Sections are the fields of Settings.
_ENV_KEYS: dict[str, tuple[str | None, str]] = {
    "RAGCACHE_HOME": (None, "home"),
    "RAGCACHE_FAILPOINTS": (None, "failpoints"),  # read by ragcache.failpoints
    "RAGCACHE_BLAS": ("blas", "mode"),
    "RAGCACHE_BLAS_LIBRARY": ("blas", "library"),
    "RAGCACHE_SKINNY_GEMM": ("blas", "skinny_gemm"),
    "RAGCACHE_FAST_SOFTMAX": ("blas", "fast_softmax"),
    "RAGCACHE_DECODE_ATTENTION": ("blas", "decode_attention"),
    "RAGCACHE_PACKED_WEIGHTS": ("blas", "packed_weights"),
    "RAGCACHE_Q4_WEIGHTS": ("blas", "q4_weights"),
    "RAGCACHE_OUTPUT_SCREEN": ("blas", "output_screen"),
    "RAGCACHE_ROPE_TABLES": ("blas", "rope_tables"),
    "RAGCACHE_COMPILED_NORMS": ("blas", "compiled_norms"),
    "RAGCACHE_MODEL": ("model", "name"),
    "RAGCACHE_QUANT": ("model", "quant"),
    "RAGCACHE_PREFILL_STEP_SIZE": ("generation", "prefill_step_size"),
    "RAGCACHE_MAX_TOKENS": ("generation", "max_tokens"),
    "RAGCACHE_SPECULATION": ("generation", "speculation"),
    "RAGCACHE_CHUNK_REUSE": ("generation", "chunk_reuse"),
}


def register_env_key(name: str, section: str | None, key: str) -> None:
    """Let a component declare an environment variable it owns (keeps the unknown-key check exact)."""
    _ENV_KEYS[name] = (section, key)


def _coerce(value: str, like: Any, name: str) -> Any:
    try:
        if isinstance(like, bool):
            if value.lower() in {"1", "true", "yes", "on"}:
                return True
            if value.lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError(value)
        if isinstance(like, int):
            return int(value)
        if isinstance(like, float):
            return float(value)
        if isinstance(like, Path):
            return Path(value).expanduser()
    except ValueError as exc:
        raise ConfigError(
            f"{name}={value!r} is not a valid {type(like).__name__}", hint=f"unset {name} or fix it"
        ) from exc
    return value


def load_settings(environ: Mapping[str, str] = os.environ, **overrides: Any) -> Settings:
    """Build Settings from defaults, then `RAGCACHE_*` variables, then keyword overrides per section.

    Raises ConfigError on an unknown `RAGCACHE_*` variable or a value of the wrong type.
    """
    settings = Settings(home=default_home(environ))
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in _ENV_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown environment variable(s): {', '.join(unknown)}",
            hint="known ones: " + ", ".join(sorted(_ENV_KEYS)),
        )
    for name, (section, key) in _ENV_KEYS.items():
        if name not in environ or section is None:
            continue
        part = getattr(settings, section)
        value = _coerce(environ[name], getattr(part, key), name)
        settings = replace(settings, **{section: replace(part, **{key: value})})
    for section, values in overrides.items():
        part = getattr(settings, section)
        known = {f.name for f in fields(part)}
        bad = set(values) - known
        if bad:
            raise ConfigError(f"unknown {section} setting(s): {', '.join(sorted(bad))}")
        settings = replace(settings, **{section: replace(part, **values)})
    return settings


def read_blas_settings(environ: Mapping[str, str] = os.environ) -> BlasSettings:
    """BLAS settings alone: read at import time, before anything else may fail."""

    def on(name: str) -> bool:  # lenient here (import time must not fail); load_settings is not
        return environ.get(name, "1").lower() not in {"0", "false", "no", "off"}

    return BlasSettings(
        mode=environ.get("RAGCACHE_BLAS", "auto"),
        library=environ.get("RAGCACHE_BLAS_LIBRARY", ""),
        skinny_gemm=on("RAGCACHE_SKINNY_GEMM"),
        fast_softmax=on("RAGCACHE_FAST_SOFTMAX"),
        decode_attention=on("RAGCACHE_DECODE_ATTENTION"),
        packed_weights=on("RAGCACHE_PACKED_WEIGHTS"),
        q4_weights=on("RAGCACHE_Q4_WEIGHTS"),
        rope_tables=on("RAGCACHE_ROPE_TABLES"),
        output_screen=on("RAGCACHE_OUTPUT_SCREEN"),
        compiled_norms=on("RAGCACHE_COMPILED_NORMS"),
    )
