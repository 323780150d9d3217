"""Greedy decode steps that read a quarter of the output layer: the argmax without every logit.

A greedy step needs only the argmax of its logits, yet the output layer is the largest weight a
decode step reads: 671 MB of Gemma 3 270M's 1.07 GB (a 262,144-word vocabulary), 113 MB of
SmolLM2-135M's 538 MB. On CPU a step is bound by reading weights, so `native/output_screen.c`
scores every word from an 8-bit copy of that weight, with a proven bound on the distance from
each score to the logit the full product gives, and computes exactly (with the full product's
bits) only the 16-word blocks that can hold the argmax; every other logit comes back as -inf.
The greedy token is the full product's, for mlx-lm's rule (argmax of the log-probabilities) and
for a plain argmax; where that is not proven the step computes the full product itself.

What the logits are then used for decides whether a step may take it: only a greedy pick. So a
step asks for it in `greedy_steps()` (the worker's batch steps whose sequences are all greedy,
and its speculative steps), and the output layer of a model `install`ed here then requests the
screened product (a NaN alpha only this library's `cblas_sgemm` takes, as `ragcache.attention`
does) for products of up to `MAX_ROWS` rows (a decode step, a batch of them, a short
speculative verify), each row screened on its own while the 8-bit copy is read once. Everywhere else (prefill, sampling with a temperature, anything
outside the worker) it is MLX's ordinary product. The K/V a step writes does not depend on the
output layer, so cached KV and the model's cache identity are unaffected.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ragcache.skinny_gemm import MAX_ROWS, SkinnyGemm

_state = threading.local()  # .on: this thread is building a greedy step's graph
_kernel: SkinnyGemm | None = None
_suspended = 0  # how many `suspended()` blocks are open, in any thread


@contextlib.contextmanager
def greedy_steps(on: bool = True) -> Iterator[None]:
    """Within this block, this thread's forward passes only pick their next tokens greedily
    from the logits (nothing reads the logits otherwise): their output products of few rows may be
    screened. Nested blocks restore the outer setting."""
    outer = getattr(_state, "on", False)
    _state.on = on
    try:
        yield
    finally:
        _state.on = outer


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Within this block no step of any thread is screened (every logit computed): the
    baseline of benchmarks and tests."""
    global _suspended
    _suspended += 1
    try:
        yield
    finally:
        _suspended -= 1


def _screening() -> bool:
    return _kernel is not None and not _suspended and getattr(_state, "on", False)


def _screened(x: mx.array, weight: mx.array) -> mx.array | None:
    """`x @ weight.T` as a greedy step's screened product, or None where it does not apply
    (more rows than the kernel takes: a prefill, a long verify)."""
    if _kernel is None or x.size > MAX_ROWS * x.shape[-1] or x.dtype != mx.float32:
        return None
    zero = mx.array(0.0, mx.float32)
    return mx.addmm(zero, x, weight.T, alpha=_kernel.screen_alpha, beta=0.0)


class ScreenedLinear(nn.Linear):
    """An output `nn.Linear` whose greedy products of few rows are screened."""

    def __call__(self, x: mx.array) -> mx.array:
        if _screening() and "bias" not in self:
            out = _screened(x, self["weight"])
            if out is not None:
                return out
        return super().__call__(x)


class ScreenedEmbedding(nn.Embedding):
    """A tied embedding whose `as_linear` (the output layer) screens greedy products of few rows."""

    def as_linear(self, x: mx.array) -> mx.array:
        if _screening():
            out = _screened(x, self.weight)
            if out is not None:
                return out
        return super().as_linear(x)


# mlx-lm model modules whose Model returns the output layer's product unchanged. Others may
# transform the logits after it (Granite divides them, Cohere scales them, Gemma 2 soft-caps
# them): the screen's proof of the argmax is in the output layer's own units, so they are left
# alone.
UNCHANGED_LOGITS = frozenset(
    f"mlx_lm.models.{name}" for name in ("llama", "gemma3_text", "qwen2", "qwen3")
)


def output_module(model: nn.Module) -> nn.Module | None:
    """The module that computes `model`'s logits, for models whose logits are its product
    unchanged (`UNCHANGED_LOGITS`; a multimodal wrapper's language model): an `lm_head` Linear,
    or the input embedding when the output layer is tied to it (its `as_linear`)."""
    language: nn.Module = getattr(model, "language_model", None) or model
    if type(language).__module__ not in UNCHANGED_LOGITS:
        return None
    head = getattr(language, "lm_head", None)
    if isinstance(head, nn.Linear):
        return head
    embed = getattr(getattr(language, "model", None), "embed_tokens", None)
    return embed if isinstance(embed, nn.Embedding) else None


def install(model: nn.Module, kernel: SkinnyGemm) -> bool:
    """Give `model`'s output layer a screen in `kernel` (its weight must already be packed) and
    route its greedy products of few rows there. False: nothing installed (no float32 output layer
    found, or the kernel refused the screen); the model is then unchanged."""
    global _kernel
    module = output_module(model)
    if module is None:
        return False
    weight = module["weight"]
    if (
        weight.ndim != 2
        or weight.dtype != mx.float32
        or (isinstance(module, nn.Linear) and "bias" in module)
    ):
        return False
    routes_to: dict[type, type[nn.Module]] = {
        nn.Linear: ScreenedLinear,
        nn.Embedding: ScreenedEmbedding,
        ScreenedLinear: ScreenedLinear,  # installed again: a new screen (the weight repacked)
        ScreenedEmbedding: ScreenedEmbedding,
    }
    routed = routes_to.get(type(module))
    if routed is None:  # a subclass with code of its own: left alone
        return False
    view = np.array(weight, copy=False)  # the memory the product is given, as packed
    n, k = weight.shape
    if not view.flags["C_CONTIGUOUS"] or not kernel.screen(view.ctypes.data, n, k):
        return False
    _kernel = kernel
    module.__class__ = routed
    return True


def routes(model: nn.Module) -> bool:
    """Whether `model`'s output layer takes screened greedy steps."""
    return isinstance(output_module(model), (ScreenedLinear, ScreenedEmbedding))
