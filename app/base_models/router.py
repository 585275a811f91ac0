from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from app.base_models import service
from app.base_models.schemas import BaseModelList, BaseModelOut
from app.core.auth import Owner, current_owner
from app.core.settings import Settings, get_settings

router = APIRouter(prefix="/v1/base-models", tags=["base models"])


@router.get("", response_model=BaseModelList)
def list_base_models(
    source: str | None = Query(None, pattern="^(open_clip|local)$"),
    refresh: bool = Query(False, description="rescan LAFTER_LOCAL_MODEL_DIRS"),
    settings: Settings = Depends(get_settings),
    _owner: Owner = Depends(current_owner),
) -> BaseModelList:
    items = [BaseModelOut(**m) for m in service.available(settings, refresh=refresh)]
    if source:
        items = [m for m in items if m.source == source]
    return BaseModelList(data=items)
