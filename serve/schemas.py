"""Wire types of the API (msgspec Structs): Litestar validates requests against them and publishes
them in the OpenAPI schema. Static bounds here keep absurd values out; the limits an operator
configures (max_tokens, k, prompt tokens) are checked by the handlers and answered with 422/413."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

MaxTokens = Annotated[int, Meta(ge=1, le=1_000_000)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
Seed = Annotated[int, Meta(ge=0, le=2**32 - 1)]
StopString = Annotated[str, Meta(min_length=1, max_length=200)]
Stop = StopString | Annotated[list[StopString], Meta(max_length=16)]
K = Annotated[int, Meta(ge=1, le=1000)]
Order = Literal["cache", "relevance", "canonical"]
AnswerMode = Literal["auto", "generate", "extract"]
Where = Annotated[str, Meta(min_length=1, max_length=2000)]
Speculation = Literal["lookup", "off"]  # greedy decoding drafts from the prompt; same tokens
# "epic": copy the K/V of chunks computed in earlier prompts (close to, not the same as, exact)
ChunkReuse = Literal["off", "epic"]


class _Wire(Struct, kw_only=True):
    pass


# -- shared ------------------------------------------------------------------------------------
class PromptTokensDetails(_Wire, kw_only=True):
    cached_tokens: int  # prompt tokens restored from the KV cache instead of computed
    chunk_reused_tokens: int = 0  # extension: copied from chunk entries (chunk_reuse "epic")


class Usage(_Wire, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class SourceOut(_Wire, kw_only=True):
    number: int  # the [n] the answer cites
    chunk_id: str
    doc_id: str
    source: str
    title: str
    heading_path: list[str]
    position: int
    score: float
    text: str  # the chunk's text: quotes' start/end index into it
    cached: bool = False  # its KV came from the cache (it lies in the restored prefix)


# -- OpenAI-compatible ---------------------------------------------------------------------------
class TextPart(_Wire, kw_only=True):
    type: Literal["text"]
    text: str


class ChatMessage(_Wire, kw_only=True):
    role: Literal["system", "developer", "user", "assistant"]
    # A list of text parts keeps each part its own cache segment (e.g. one per document).
    content: str | list[TextPart] | None = None
    name: str | None = None


class StreamOptions(_Wire, kw_only=True):
    include_usage: bool = False


class RetrievalOptions(_Wire, kw_only=True):
    """Extension: answer the last user message from the store, with citations."""

    k: K | None = None
    order: Order | None = None
    where: Where | None = None


class ChatCompletionRequest(_Wire, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=512)]
    model: str = ""
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    n: Annotated[int, Meta(ge=1, le=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    retrieval: RetrievalOptions | None = None
    speculation: Speculation | None = None  # extension: "off" decodes one token per step
    chunk_reuse: ChunkReuse | None = None  # extension; None: the server's setting


class CompletionRequest(_Wire, kw_only=True):
    prompt: Annotated[str, Meta(min_length=1)]
    model: str = ""
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    n: Annotated[int, Meta(ge=1, le=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    speculation: Speculation | None = None  # extension: "off" decodes one token per step
    chunk_reuse: ChunkReuse | None = None  # extension; None: the server's setting


class AssistantMessage(_Wire, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Wire, kw_only=True):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(_Wire, kw_only=True):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    # Extension, with `retrieval`: the numbered sources of the prompt and the numbers cited.
    sources: list[SourceOut] | None = None
    citations: list[int] | None = None


class CompletionChoice(_Wire, kw_only=True):
    index: int
    text: str
    finish_reason: str
    logprobs: None = None


class TextCompletion(_Wire, kw_only=True):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(_Wire, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ragcache"


class ModelList(_Wire, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- /v1/ask -------------------------------------------------------------------------------------
class AskRequest(_Wire, kw_only=True):
    question: Annotated[str, Meta(min_length=1, max_length=100_000)]
    k: K | None = None
    order: Order | None = None
    mode: AnswerMode | None = None  # auto: the model's answer if supported, else a quote
    where: Where | None = None
    stream: bool = True
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    speculation: Speculation | None = None
    chunk_reuse: ChunkReuse | None = None  # None: the server's setting
    # The id an earlier answer returned: this question continues that conversation (its turns
    # are in the prompt, and its path in the KV cache is reused).
    conversation: Annotated[str, Meta(min_length=1, max_length=64)] | None = None


class AskUsage(_Wire, kw_only=True):
    prompt_tokens: int
    cached_tokens: int  # restored from the exact prefix cache
    recomputed_tokens: int
    chunk_reused_tokens: int = 0  # copied from chunk entries (chunk_reuse "epic")
    completion_tokens: int
    ttft_s: float  # request arrival to first token, retrieval included


class QuoteOut(_Wire, kw_only=True):
    """The passage span that supports one sentence of the answer."""

    sentence: int  # index of the answer sentence
    number: int  # the source's [n]
    chunk_id: str
    start: int  # character span in the chunk's text
    end: int
    quote: str
    score: float


class AskAnswer(_Wire, kw_only=True):
    answer: str  # checked against the sources: supported sentences with [n], a quote, or a decline
    citations: list[int]  # source numbers the answer cites, in order of first citation
    quotes: list[QuoteOut]  # the evidence of each cited sentence
    method: str  # "generated", "extracted" or "declined"
    declined: bool
    confidence: float  # the best evidence score for the question, in [0, 1]
    model_text: str  # what the model generated, before checking ("" when it did not run)
    sources: list[SourceOut]  # in prompt order
    order: str
    finish_reason: str  # stop, length, loop, cancelled; extracted/declined when no model ran
    usage: AskUsage
    figures: dict[str, Any]  # the core's figures: retrieval_ms, prefill/decode tok/s, ...
    conversation: str = ""  # send it back as `conversation` to ask a follow-up


# -- documents -----------------------------------------------------------------------------------
class DocumentText(_Wire, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=200)]  # a file name: notes.md, faq.txt
    text: str


class DocumentsUpload(_Wire, kw_only=True):
    documents: Annotated[list[DocumentText], Meta(min_length=1, max_length=100)]


class SkippedOut(_Wire, kw_only=True):
    path: str
    reason: str


class IngestResult(_Wire, kw_only=True):
    documents: list[str]  # ids of the documents this upload names
    added: list[str]
    updated: list[str]
    unchanged: int
    skipped: list[SkippedOut]
    chunks_written: int
    total_chunks: int
    kv_nodes_dropped: int  # cache entries that held replaced chunks
    elapsed_s: float


class DocumentInfo(_Wire, kw_only=True):
    id: str
    source: str
    chunks: int
    ingested_at: str | None = None  # ISO 8601, UTC


class DocumentList(_Wire, kw_only=True):
    documents: list[DocumentInfo]
    total: int


class DeletedDocument(_Wire, kw_only=True):
    id: str
    chunks_deleted: int
    kv_nodes_dropped: int
    file_removed: bool


# -- cache, health -------------------------------------------------------------------------------
class CacheFigures(_Wire, kw_only=True):
    stats: dict[str, Any] | None  # None when the cache is off
    queue_depth: int
    in_flight: int
    active: int
    worker_crashes: int = 0  # times the model worker crashed and restarted
    worker_healthy: bool = True


class CacheNode(_Wire, kw_only=True):
    id: int
    parent: int | None  # None: hangs from the root
    start: int  # token position of the node's first token
    tokens: int
    hits: int  # requests whose prompt went through this node
    bytes: int
    in_ram: bool
    on_disk: bool
    label: str  # the start of the node's text


class CacheTree(_Wire, kw_only=True):
    nodes: list[CacheNode]  # the most-hit nodes and their ancestors, parents first


class Health(_Wire, kw_only=True):
    status: str


class Readiness(_Wire, kw_only=True):
    ready: bool
    model: str | None = None
    chunks: int | None = None
    reason: str | None = None


# -- batches -------------------------------------------------------------------------------------
class BatchDocument(_Wire, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=200)]
    text: str


class BatchCreate(_Wire, kw_only=True):
    # One object per line of a batch file: {"id": "q1", "question": "..."} or the OpenAI Batch
    # API shape. A malformed entry becomes an error line in the output, not a rejected upload.
    questions: Annotated[list[Any], Meta(max_length=100_000)]
    # Given: long-context mode (the documents are the shared prefix); absent: RAG over the store.
    docs: Annotated[list[str | BatchDocument], Meta(max_length=100)] | None = None
    max_tokens: MaxTokens | None = None
    k: K | None = None
    order: Order | None = None


class BatchOut(_Wire, kw_only=True):
    id: str
    object: Literal["batch"] = "batch"
    status: str  # pending, running, completed, cancelled, failed
    mode: str  # rag or long_context
    created_at: int
    progress: dict[str, Any]  # counts, tokens, elapsed and ETA (ragcache.batch.BatchStatus)


class BatchList(_Wire, kw_only=True):
    object: Literal["list"] = "list"
    data: list[BatchOut]
