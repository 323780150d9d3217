"""/v1/batches: start a batch of questions, watch it, read its answers, cancel it.

An upload is multipart (field `file`: the JSONL questions; optional `docs` files for long-context
mode; form fields `max_tokens`, `k`, `order`) or JSON `{"questions": [...], "docs": [...], ...}`.
Jobs run on the service's one model worker, beside the interactive requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import UploadFile
from litestar.exceptions import ClientException, HTTPException, ValidationException
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import (
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from litestar.params import FromPath

from ragcache.batch import Document
from ragcache.order import ORDERS
from serve.batches import BatchOptions, documents
from serve.schemas import BatchCreate, BatchDocument, BatchList, BatchOut
from serve.services import AppStateDep, ServicesDep

NDJSON = "application/x-ndjson"
_OPTIONS = {
    "max_tokens": Schema(type=OpenAPIType.INTEGER, minimum=1),
    "k": Schema(type=OpenAPIType.INTEGER, minimum=1),
    "order": Schema(type=OpenAPIType.STRING, enum=list(ORDERS)),
}
_JSON_BODY = Schema(
    type=OpenAPIType.OBJECT,
    required=["questions"],
    properties={
        "questions": Schema(
            type=OpenAPIType.ARRAY, max_items=100_000, items=Schema(type=OpenAPIType.OBJECT)
        ),
        "docs": Schema(
            type=OpenAPIType.ARRAY,
            max_items=100,
            items=Schema(type=OpenAPIType.STRING, min_length=1),
        ),
        **_OPTIONS,
    },
)
_FORM_BODY = Schema(
    type=OpenAPIType.OBJECT,
    required=["file"],
    properties={
        "file": Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY),
        "docs": Schema(
            type=OpenAPIType.ARRAY,
            items=Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY),
        ),
        **_OPTIONS,
    },
)


@dataclass
class BatchUploadOperation(Operation):
    """The handler reads the body itself (two media types), so the schema is stated here."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            required=True,
            content={
                "application/json": OpenAPIMediaType(schema=_JSON_BODY),
                "multipart/form-data": OpenAPIMediaType(schema=_FORM_BODY),
            },
        )


def _form_int(value: Any, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValidationException(f"{name} must be an integer", extra=[{"key": name}]) from None
    if number < 1:
        raise ValidationException(f"{name} must be >= 1", extra=[{"key": name}])
    return number


async def _read_upload(request: Request) -> tuple[bytes, list[Document], BatchOptions]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise ValidationException("the form has no `file`", extra=[{"key": "file"}])
        questions = await file.read()
        texts = []
        for i, value in enumerate(form.getall("docs") if "docs" in form else []):
            if not isinstance(value, UploadFile):
                raise ValidationException("`docs` must be files", extra=[{"key": "docs"}])
            raw = await value.read()
            texts.append((value.filename or f"doc{i + 1}", raw.decode("utf-8", "replace")))
        order = form.get("order") or None
        if order is not None and order not in ORDERS:
            raise ValidationException(
                f"order must be one of: {', '.join(ORDERS)}", extra=[{"key": "order"}]
            )
        options = BatchOptions(
            _form_int(form.get("max_tokens"), "max_tokens"),
            _form_int(form.get("k"), "k"),
            order if isinstance(order, str) else None,
        )
        return questions, documents(texts), options
    if content_type.startswith("application/json"):
        try:
            data = msgspec.json.decode(await request.body(), type=BatchCreate)
        except msgspec.ValidationError as exc:
            raise ValidationException(str(exc)) from exc
        except msgspec.DecodeError as exc:
            raise ClientException(f"the body is not JSON: {exc}") from exc
        lines = b"".join(msgspec.json.encode(q) + b"\n" for q in data.questions)
        texts = [
            (d.name, d.text) if isinstance(d, BatchDocument) else (f"doc{i + 1}", d)
            for i, d in enumerate(data.docs or [])
        ]
        return lines, documents(texts), BatchOptions(data.max_tokens, data.k, data.order)
    raise HTTPException(
        status_code=415, detail="send a multipart/form-data `file` or application/json questions"
    )


class BatchesController(Controller):
    """`request_max_body_size` is set per app (the upload limit) by `create_app`."""

    path = "/v1/batches"
    tags = ["batches"]

    @post(
        status_code=202,
        summary="Start a batch: a JSONL file of questions, answered in the background",
        operation_class=BatchUploadOperation,
    )
    async def create(
        self, request: Request, app_state: AppStateDep, services: ServicesDep
    ) -> BatchOut:
        questions, docs, options = await _read_upload(request)
        entry = await app_state.off_loop(
            lambda: app_state.batches.create(services, questions, docs, options)
        )
        return entry.out()

    @get(summary="List the batches of this service run, newest first")
    async def list(self, app_state: AppStateDep) -> BatchList:
        entries = app_state.batches.list()
        return BatchList(data=[e.out() for e in entries])

    @get("/{batch_id:str}", summary="A batch's status, counts and progress")
    async def status(self, batch_id: FromPath[str], app_state: AppStateDep) -> BatchOut:
        return app_state.batches.get(batch_id).out()

    @get(
        "/{batch_id:str}/output",
        summary="The answers written so far, one JSON record per line",
        media_type=NDJSON,
        responses={200: ResponseSpec(str, description="JSON lines", media_type=NDJSON)},
    )
    async def output(self, batch_id: FromPath[str], app_state: AppStateDep) -> Response[bytes]:
        entry = app_state.batches.get(batch_id)
        data = await app_state.off_loop(entry.output)
        return Response(data, media_type=NDJSON)

    @post("/{batch_id:str}/cancel", status_code=200, summary="Cancel a batch; answers stay")
    async def cancel(self, batch_id: FromPath[str], app_state: AppStateDep) -> BatchOut:
        entry = app_state.batches.get(batch_id)
        entry.job.cancel()
        # Briefly: the job stops between steps, so the answer usually shows it cancelled.
        status = await app_state.off_loop(lambda: entry.job.wait(2.0))
        return entry.out(status)
