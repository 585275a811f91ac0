from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile

from app.core.auth import Owner, current_owner, request_owner
from app.core.db import get_session, get_sessionmaker
from app.core.errors import Invalid
from app.core.fields import parse_json
from app.core.pagination import Page, PageParams, page_params, paginate
from app.core.settings import get_settings
from app.models import repository, service
from app.models.runtime import ModelRuntime, get_runtime
from app.models.schemas import ClassifyJSON, ClassifyResponse, ModelOut
from app.models.service import NamedImage
from app.models.tables import Model

router = APIRouter(tags=["models"])

_CLASSIFY_BODY = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "top_k": {"type": "integer", "default": 5},
                        "base_model": {"type": "string", "description": "zero-shot only"},
                        "class_names": {
                            "type": "string",
                            "description": "zero-shot only: JSON array, or repeat the field",
                        },
                    },
                    "required": ["files"],
                }
            },
            "application/json": {"schema": ClassifyJSON.model_json_schema()},
        },
        "required": True,
    }
}


@dataclass
class ClassifyInput:
    images: list[NamedImage]
    top_k: int
    base_model: str | None = None
    class_names: list[str] | None = None


def _int(value: object, field: str, default: int) -> int:
    if value in (None, ""):
        return default
    try:
        number = int(str(value))
    except ValueError:
        raise Invalid(f"{field} must be an integer", code="validation_error", field=field) from None
    if number < 1:
        raise Invalid(f"{field} must be >= 1", code="validation_error", field=field)
    return number


async def classify_input(request: Request) -> ClassifyInput:
    """Multipart (``files`` + form fields) or JSON (base64 ``images``), in one endpoint."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=get_settings().classify_max_images + 1)
        images = []
        for key in ("files", "file", "images"):
            for item in form.getlist(key):
                if isinstance(item, UploadFile):
                    images.append(NamedImage(item.filename, await item.read()))
        raw_names = [str(v) for v in form.getlist("class_names")]
        class_names: list[str] | None = None
        if len(raw_names) == 1 and raw_names[0].strip().startswith("["):
            try:
                parsed = parse_json(raw_names[0])
            except ValueError as exc:
                raise Invalid(
                    f"class_names is not a JSON array: {exc}", code="validation_error", field="class_names"
                ) from None
            if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
                raise Invalid(
                    "class_names must be a list of strings", code="validation_error", field="class_names"
                )
            class_names = parsed
        elif raw_names:
            class_names = raw_names
        base = form.get("base_model")
        return ClassifyInput(
            images=images,
            top_k=_int(form.get("top_k"), "top_k", 5),
            base_model=str(base) if base is not None else None,
            class_names=class_names,
        )
    if ctype.startswith("application/json"):
        try:
            body = ClassifyJSON.model_validate_json(await request.body())
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise Invalid(f"{field}: {first['msg']}", code="validation_error", field=field) from None
        decoded = []
        for i, text in enumerate(body.images):
            try:
                data = base64.b64decode(
                    text.split(",", 1)[-1] if text.startswith("data:") else text, validate=True
                )
            except (binascii.Error, ValueError):
                raise Invalid(
                    f"images.{i} is not base64", code="image_not_base64", field=f"images.{i}"
                ) from None
            name = body.filenames[i] if body.filenames and i < len(body.filenames) else None
            decoded.append(NamedImage(name, data))
        return ClassifyInput(decoded, body.top_k, body.base_model, body.class_names)
    raise Invalid(
        "send multipart/form-data with files, or application/json with base64 images",
        code="unsupported_media_type",
        status=415,
    )


@router.get("/v1/models", response_model=Page[ModelOut])
def list_models(
    params: PageParams = Depends(page_params),
    owner: Owner = Depends(current_owner),
    session: Session = Depends(get_session),
) -> Page[ModelOut]:
    rows, has_more, cursor = paginate(session, repository.list_query(owner.id), Model.id, params)
    return Page[ModelOut](data=[service.to_out(r) for r in rows], has_more=has_more, next_cursor=cursor)


@router.get("/v1/models/{model_id}", response_model=ModelOut)
def get_model(
    model_id: str, owner: Owner = Depends(current_owner), session: Session = Depends(get_session)
) -> ModelOut:
    return service.to_out(service.get(session, owner, model_id))


@router.delete("/v1/models/{model_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_model(
    model_id: str,
    owner: Owner = Depends(current_owner),
    session: Session = Depends(get_session),
    runtime: ModelRuntime = Depends(get_runtime),
) -> Response:
    service.delete(session, owner, model_id)
    session.commit()
    runtime.forget(model_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# The classify routes are the hot path: async all the way to one thread hop (decode, the model's
# row, then the shared forward of app.models.batching), no per-request dependency in a thread.
@router.post("/v1/models/{model_id}/classify", response_model=ClassifyResponse, openapi_extra=_CLASSIFY_BODY)
async def classify(
    model_id: str,
    data: ClassifyInput = Depends(classify_input),
    owner: Owner = Depends(request_owner),
) -> ClassifyResponse:
    def run() -> ClassifyResponse:
        with get_sessionmaker()() as session:
            return service.classify_with_model(
                session, owner, model_id, data.images, data.top_k, get_runtime(), get_settings()
            )

    return await run_in_threadpool(run)


@router.post("/v1/classify", response_model=ClassifyResponse, openapi_extra=_CLASSIFY_BODY, tags=["classify"])
async def classify_zero_shot(
    data: ClassifyInput = Depends(classify_input),
    _owner: Owner = Depends(request_owner),
) -> ClassifyResponse:
    return await run_in_threadpool(
        service.classify_zero_shot,
        data.base_model,
        data.class_names,
        data.images,
        data.top_k,
        get_runtime(),
        get_settings(),
    )
