"""`/v1/files`: batch input files uploaded by clients, and the output and error files of batches."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi import File as FileParam
from fastapi.responses import Response
from sqlalchemy import exists, select
from sqlalchemy.orm import undefer

from api.batches.records import file_object
from api.batches.validation import BatchFileReader
from api.http.deps import ServicesDep, SessionDep
from api.http.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from api.http.pagination import newest_first
from api.openai.protocol import FileDeleted, FileList, FileObject
from api.tenancy.auth import Principal, PrincipalDep
from shared.models import Batch, File

router = APIRouter(prefix="/v1/files", tags=["files"])

FILE_NOT_FOUND = "no file with id '{file_id}'"
FILE_IN_USE = "file '{file_id}' is the input of batch '{batch_id}' and cannot be deleted"
FILE_REFUSED = "{filename}: {problems}"
FILE_MORE_LINES = "; and {count} more bad lines"
PURPOSES = ("batch",)
_CHUNK_BYTES = 1 << 20
_LINES_IN_MESSAGE = 5  # the first few bad lines; the rest only counted


async def _get(session: SessionDep, principal: Principal, file_id: str, *, content: bool = False) -> File:
    stmt = principal.scope(select(File).where(File.id == file_id), File.tenant)
    if content:
        stmt = stmt.options(undefer(File.content))
    file = (await session.execute(stmt)).scalar_one_or_none()
    if file is None:
        raise NotFound(FILE_NOT_FOUND.format(file_id=file_id), param="file_id")
    return file


def _refused(filename: str, reader: BatchFileReader) -> InvalidRequest:
    """The upload's 400: the file's name and its first bad lines, the way the batch would list them."""
    shown = reader.errors[:_LINES_IN_MESSAGE]
    problems = "; ".join(f"line {e.line}: {e.message}" if e.line else e.message for e in shown)
    if reader.bad > len(shown):
        problems += FILE_MORE_LINES.format(count=reader.bad - len(shown))
    return InvalidRequest(
        FILE_REFUSED.format(filename=filename, problems=problems), param="file", code=shown[0].code
    )


@router.post("", response_model=FileObject, summary="Upload a JSONL batch input file")
async def upload_file(
    services: ServicesDep,
    session: SessionDep,
    principal: PrincipalDep,
    file: Annotated[UploadFile, FileParam(description="JSONL, one batch request per line.")],
    purpose: Annotated[str, Form(description="Only 'batch' is supported.")],
) -> FileObject:
    if purpose not in PURPOSES:
        raise InvalidRequest(f"purpose must be one of: {', '.join(PURPOSES)}", param="purpose")
    filename = (file.filename or "upload.jsonl").replace("\x00", "")[:255] or "upload.jsonl"
    limits = services.settings.batches
    # PURPOSES is "batch" alone: every upload is a batch input file, checked as OpenAI checks one.
    reader = BatchFileReader(limits, keep=False)
    chunks: list[bytes] = []
    size = 0
    # Read in chunks, each checked as it comes: a line over the limit ends the read there, unparsed.
    while chunk := await file.read(_CHUNK_BYTES):
        size += len(chunk)
        if size > limits.max_file_bytes:
            raise PayloadTooLarge(f"files are limited to {limits.max_file_bytes} bytes", param="file")
        reader.feed(chunk)
        if reader.stopped:
            break
        chunks.append(chunk)
    reader.close()
    if reader.errors:
        raise _refused(filename, reader)
    content = b"".join(chunks)
    chunks.clear()  # one copy of the file in memory while the row is written, not two
    record = File(
        tenant=principal.owner,
        purpose=purpose,
        filename=filename,
        size=len(content),
        lines=reader.count,
        content=content,
    )
    async with session.begin():
        session.add(record)
    return file_object(record)


@router.get("", response_model=FileList, summary="List files, newest first")
async def list_files(
    session: SessionDep,
    principal: PrincipalDep,
    purpose: Annotated[str | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    after: Annotated[str | None, Query(description="Id of the last file of the previous page.")] = None,
) -> FileList:
    stmt = select(File)
    if purpose is not None:
        stmt = stmt.where(File.purpose == purpose)
    page, has_more = await newest_first(session, principal, File, stmt, after=after, limit=limit, noun="file")
    return FileList(
        data=[file_object(f) for f in page],
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=has_more,
    )


@router.get("/{file_id}", response_model=FileObject, summary="Get a file's description")
async def get_file(file_id: str, session: SessionDep, principal: PrincipalDep) -> FileObject:
    return file_object(await _get(session, principal, file_id))


@router.get(
    "/{file_id}/content",
    response_class=Response,
    responses={200: {"content": {"application/jsonl": {}}}},
    summary="Download a file",
)
async def file_content(file_id: str, session: SessionDep, principal: PrincipalDep) -> Response:
    file = await _get(session, principal, file_id, content=True)
    return Response(
        file.content,
        media_type="application/jsonl",
        headers={"Content-Disposition": f'attachment; filename="{file.filename}"'},
    )


@router.delete("/{file_id}", response_model=FileDeleted, summary="Delete a file no batch reads")
async def delete_file(file_id: str, session: SessionDep, principal: PrincipalDep) -> FileDeleted:
    async with session.begin():
        file = await _get(session, principal, file_id)
        user = await session.scalar(select(Batch.id).where(Batch.input_file_id == file_id).limit(1))
        if user is not None:
            raise Conflict(FILE_IN_USE.format(file_id=file_id, batch_id=user), param="file_id")
        if await session.scalar(
            select(exists().where((Batch.output_file_id == file_id) | (Batch.error_file_id == file_id)))
        ):
            # A batch's results stay as long as the batch: it points at them.
            raise Conflict(f"file '{file_id}' holds a batch's results and cannot be deleted", param="file_id")
        await session.delete(file)
    return FileDeleted(id=file_id, deleted=True)
