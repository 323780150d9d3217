"""POST/GET /v1/documents and DELETE /v1/documents/{id}.

An upload is multipart files or JSON `{"documents": [{"name": "notes.md", "text": "..."}]}`; it
runs one ingest job before answering (jobs with progress belong to the batches endpoints).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.datastructures import UploadFile
from litestar.exceptions import ClientException, HTTPException, ValidationException
from litestar.openapi.spec import (
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from litestar.params import FromPath, Parameter

from serve.documents import Upload, delete_document, ingest_uploads, list_documents
from serve.errors import NotFoundError
from serve.schemas import DeletedDocument, DocumentList, DocumentsUpload, IngestResult
from serve.services import AppStateDep, ServicesDep

_JSON_BODY = Schema(
    type=OpenAPIType.OBJECT,
    required=["documents"],
    properties={
        "documents": Schema(
            type=OpenAPIType.ARRAY,
            min_items=1,
            max_items=100,
            items=Schema(
                type=OpenAPIType.OBJECT,
                required=["name", "text"],
                properties={
                    "name": Schema(type=OpenAPIType.STRING, min_length=1, max_length=200),
                    "text": Schema(type=OpenAPIType.STRING),
                },
            ),
        )
    },
)
_FILES_BODY = Schema(
    type=OpenAPIType.OBJECT,
    required=["files"],
    properties={
        "files": Schema(
            type=OpenAPIType.ARRAY,
            items=Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY),
        )
    },
)


@dataclass
class UploadOperation(Operation):
    """The handler reads the body itself (two media types), so the schema is stated here."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            required=True,
            content={
                "application/json": OpenAPIMediaType(schema=_JSON_BODY),
                "multipart/form-data": OpenAPIMediaType(schema=_FILES_BODY),
            },
        )


async def _read_uploads(request: Request) -> list[Upload]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        uploads = []
        for value in form.values():
            if isinstance(value, UploadFile):
                uploads.append(Upload(value.filename or "", await value.read()))
        if not uploads:
            raise ValidationException("the form holds no files", extra=[{"key": "files"}])
        return uploads
    if content_type.startswith("application/json"):
        body = await request.body()
        try:
            data = msgspec.json.decode(body, type=DocumentsUpload)
        except msgspec.ValidationError as exc:
            raise ValidationException(str(exc)) from exc
        except msgspec.DecodeError as exc:
            raise ClientException(f"the body is not JSON: {exc}") from exc
        return [Upload(d.name, d.text.encode("utf-8", "replace")) for d in data.documents]
    raise HTTPException(
        status_code=415,
        detail="send multipart/form-data files or application/json documents",
    )


class DocumentsController(Controller):
    """`request_max_body_size` is set per app (the upload limit) by `create_app`."""

    path = "/v1/documents"
    tags = ["documents"]

    @post(
        status_code=201,
        summary="Upload files or JSON text and ingest them",
        operation_class=UploadOperation,
    )
    async def upload(
        self, request: Request, app_state: AppStateDep, services: ServicesDep
    ) -> IngestResult:
        uploads = await _read_uploads(request)
        assert app_state.ingest_lock is not None
        async with app_state.ingest_lock:
            return await app_state.off_loop(
                lambda: ingest_uploads(
                    services, uploads, app_state.core.home, app_state.settings.table
                )
            )

    @get(summary="List stored documents")
    async def list(
        self,
        app_state: AppStateDep,
        services: ServicesDep,
        offset: Annotated[int, Parameter(ge=0, le=10_000_000)] = 0,
        limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
    ) -> DocumentList:
        return await app_state.off_loop(lambda: list_documents(services, offset, limit))

    @delete("/{doc_id:path}", status_code=200, summary="Delete a document and its cached KV")
    async def remove(
        self, doc_id: FromPath[str], app_state: AppStateDep, services: ServicesDep
    ) -> DeletedDocument:
        doc_id = doc_id.lstrip("/")  # a :path parameter keeps its leading slash
        if not doc_id or len(doc_id) > 1000 or "\x00" in doc_id:
            raise NotFoundError("no such document")
        assert app_state.ingest_lock is not None
        async with app_state.ingest_lock:
            return await app_state.off_loop(lambda: delete_document(services, doc_id))
