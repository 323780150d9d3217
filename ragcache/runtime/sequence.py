"""One generation request as a state machine: begin -> prefill steps -> decode -> finish.

Everything that happens to one sequence lives here, whoever drives it: restoring its prefix from
the cache, prefill in bounded steps (pausing at the cache's capture positions), turning decoded
tokens into text (detokenizer, stop strings, loop guard, cancellation), storing its KV back into
the cache, and its statistics. The worker (`ragcache.runtime.worker`) only decides when each
sequence steps, and decodes the running ones together as one batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import mlx.core as mx

from ragcache.engine import CacheSessionLike, Completion, Engine, GenerationStats, TextDelta
from ragcache.loop_guard import LoopGuard
from ragcache.runtime.speculate import SpeculativeDecoder, cache_offset
from ragcache.runtime.ticket import DONE, Ticket
from ragcache.sampling import SamplingParams, StopMatcher
from ragcache.segments import SegmentedPrompt

log = logging.getLogger(__name__)


class Sequence:
    """A request from submission to its Completion. Driven by one thread (the worker's)."""

    def __init__(
        self, ticket: Ticket, prompt: SegmentedPrompt, params: SamplingParams, submitted: float
    ) -> None:
        self.ticket = ticket
        self.prompt = prompt
        self.params = params
        self.submitted = submitted  # perf_counter at submit: TTFT counts the queue wait too
        self.session: CacheSessionLike | None = None
        self.prompt_cache: list[Any] = []
        self.start = 0  # prompt tokens restored from the cache
        self.chunk_tokens = 0  # prompt tokens copied from chunk entries (chunk reuse)
        self.position = 0  # prompt tokens whose KV is computed
        self.uid: int | None = None  # the batch generator's id, once decoding
        self.seen: list[int] = []  # every token fed back to the model, eos included
        self.generated: list[int] = []  # the answer's tokens
        self.text: list[str] = []
        self.stopper = StopMatcher(params.stop)
        self.guard = LoopGuard() if params.stop_loops else None
        self.stop_hit = False
        self.first_token_at = 0.0
        self.prefill_done_at = 0.0
        self.counted_out = False  # the worker's in-flight count no longer includes it
        # Set once it first decodes alone, speculatively; kept after it joins the batch (its
        # cache until then, and its drafts' timings, which the worker records at its finish).
        self.spec: SpeculativeDecoder | None = None
        self.may_draft: bool | None = None  # the worker's one answer for this sequence
        self._steps: Iterator[int] | None = None
        self._detok: Any = None
        self.max_tokens = params.max_tokens

    # -- prefill ------------------------------------------------------------------------------
    def begin(self, engine: Engine) -> None:
        """Restore the longest cached prefix and get ready to prefill the rest."""
        tokens = self.prompt.tokens
        cache = engine.cache
        copies: list[Any] = []
        if cache is not None:
            self.session = cache.begin(tokens, self.prompt.boundaries)
            self.prompt_cache, self.start = self.session.prompt_cache, self.session.start
            if self.params.chunk_reuse != "off" and self.prompt.chunk_spans:
                copies = cache.assemble(self.session, self.prompt.chunk_spans)
                self.chunk_tokens = sum(c.end - c.start for c in copies)
        else:
            from mlx_lm.models.cache import make_prompt_cache

            self.prompt_cache, self.start = make_prompt_cache(engine.loaded.model), 0
        self._steps = engine.prefill_steps(
            tokens, self.start, self.prompt_cache, self.session, copies
        )
        self.position = next(self._steps)
        self._detok = engine.loaded.tokenizer.detokenizer
        self._detok.reset()
        limit = engine.loaded.context_length - len(tokens)
        self.max_tokens = max(1, min(self.params.max_tokens, limit))

    @property
    def prefilling(self) -> bool:
        return self._steps is not None

    def prefill_step(self) -> bool:
        """Run one prefill step; False (doing nothing) once only the final piece is left, which
        the decoder computes with the first token's logits."""
        assert self._steps is not None
        try:
            self.position = next(self._steps)
            return True
        except StopIteration:
            self._steps = None
            self.prefill_done_at = time.perf_counter()
            return False

    def decode_inputs(self) -> tuple[list[int], list[int], int]:
        """(the prompt tokens still to feed, those already in the KV, the most tokens to make)."""
        tokens = list(self.prompt.tokens)
        return tokens[self.position :], tokens[: self.position], self.max_tokens

    # -- decode -------------------------------------------------------------------------------
    def on_token(self, token: int, finish: str | None, eos: set[int]) -> str | None:
        """Take one decoded token (`finish`: the decoder's own verdict, "stop" or "length");
        stream its text; return why the sequence ends here, or None to go on."""
        if not self.seen:
            self.first_token_at = time.perf_counter()
        self.seen.append(token)
        reason = finish
        if not (finish == "stop" and token in eos):  # end-of-sequence is not part of the answer
            self.generated.append(token)
            self._detok.add_token(token)
            if finish is not None:
                self._detok.finalize()
            text, hit = self.stopper.feed(self._detok.last_segment)
            if text:
                self._emit(text, token)
            if hit:
                reason, self.stop_hit = "stop", True
            elif reason is None and self.guard is not None and self.guard.feed(token):
                reason = "loop"
        if reason is None and self.ticket.cancelled:
            reason = "cancelled"
        return reason

    def _emit(self, text: str, token: int) -> None:
        self.text.append(text)
        self.ticket.put(TextDelta(text, token))

    # -- end ----------------------------------------------------------------------------------
    def finish(
        self, reason: str, kv: Any, tokenizer: Any, prefill_only: bool = False
    ) -> Completion:
        """Store what the sequence computed in the cache, send its Completion; return it.

        `kv`: the live prompt cache covering the prompt and the tokens fed back (None: nothing
        to store). `prefill_only`: cancelled before decoding; the prefilled prefix is stored.
        """
        if not self.stop_hit:  # text held back as a possible stop string start is answer text
            tail = self.stopper.flush()
            if tail:
                self._emit(tail, self.generated[-1] if self.generated else -1)
        self._store(kv, prefill_only)
        now = time.perf_counter()
        first = self.first_token_at or now
        stats = GenerationStats(
            prompt_tokens=len(self.prompt.tokens),
            cached_tokens=self.start,
            recomputed_tokens=len(self.prompt.tokens) - self.start - self.chunk_tokens,
            generated_tokens=len(self.generated),
            ttft_s=first - self.submitted,
            prefill_s=first - self.submitted,
            decode_s=now - first,
            peak_memory_bytes=int(mx.get_peak_memory()),
            finish_reason=reason,
            drafted_tokens=self.spec.stats.drafted if self.spec else 0,
            accepted_tokens=self.spec.stats.accepted if self.spec else 0,
            decode_steps=self.spec.stats.steps if self.spec else 0,
            chunk_reused_tokens=self.chunk_tokens,
        )
        text, generated = "".join(self.text), list(self.generated)
        if reason == "loop" and self.guard is not None:  # keep the first copy, drop repeats
            generated = generated[: self.guard.keep_tokens]
            text = tokenizer.decode(generated)
        completion = Completion(text, generated, stats, getattr(self.session, "lookup", None))
        self.ticket.put(completion)
        self.ticket.put(DONE)
        return completion

    def _store(self, kv: Any, prefill_only: bool) -> None:
        if self.session is None:
            return
        try:
            if prefill_only:
                self.session.finish(list(self.prompt.tokens[: self.position]))
            elif kv is not None:
                # The decoder runs one step ahead, so the cache may hold a token more than was
                # yielded; its offset says exactly which tokens it covers.
                covered = (list(self.prompt.tokens) + self.seen)[: cache_offset(kv)]
                self.session.prompt_cache = kv
                self.session.finish(covered)
            else:
                self.session.abort()
        except Exception:  # storing is best effort: the answer is already complete
            log.exception("could not store request %s in the cache", self.ticket.id)
            self.session.abort()

    def fail(self, exc: BaseException) -> None:
        """End with an error: release the cache session, hand the error to the client."""
        if self.session is not None:
            try:
                self.session.abort()
            except Exception:  # the request fails either way; the worker checks the cache
                log.exception("could not release request %s's cache session", self.ticket.id)
        self.ticket.put(exc)
        self.ticket.put(DONE)
