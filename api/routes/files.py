"""`/v1/files`: batch input files uploaded by clients, and the output and error files of batches."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi import File as FileParam
from fastapi.responses import Response
from sqlalchemy import exists, select
from sqlalchemy.orm import undefer

from api.batches.records import file_object
from api.http.deps import ServicesDep, SessionDep
from api.http.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from api.http.pagination import newest_first
from api.openai.protocol import FileDeleted, FileList, FileObject
from api.tenancy.auth import Principal, PrincipalDep
from shared.models import Batch, File

router = APIRouter(prefix="/v1/files", tags=["files"])

FILE_NOT_FOUND = "no file with id '{file_id}'"
FILE_IN_USE = "file '{file_id}' is the input of batch '{batch_id}' and cannot be deleted"
PURPOSES = ("batch",)


async def _get(session: SessionDep, principal: Principal, file_id: str, *, content: bool = False) -> File:
    stmt = principal.scope(select(File).where(File.id == file_id), File.tenant)
    if content:
        stmt = stmt.options(undefer(File.content))
    file = (await session.execute(stmt)).scalar_one_or_none()
    if file is None:
        raise NotFound(FILE_NOT_FOUND.format(file_id=file_id), param="file_id")
    return file


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
    limits = services.settings.batches
    content = await file.read(limits.max_file_bytes + 1)
    if len(content) > limits.max_file_bytes:
        raise PayloadTooLarge(f"files are limited to {limits.max_file_bytes} bytes", param="file")
    lines = sum(1 for line in content.splitlines() if line.strip())
    if lines == 0:
        raise InvalidRequest("the file is empty", param="file")
    if lines > limits.max_lines:
        raise InvalidRequest(
            f"a batch file holds at most {limits.max_lines} lines; this one has {lines}", param="file"
        )
    record = File(
        tenant=principal.owner,
        purpose=purpose,
        filename=(file.filename or "upload.jsonl").replace("\x00", "")[:255] or "upload.jsonl",
        size=len(content),
        lines=lines,
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
