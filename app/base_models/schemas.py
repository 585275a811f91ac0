from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class BaseModelOut(BaseModel):
    object: Literal["base_model"] = "base_model"
    spec: str
    arch: str
    pretrained: str
    source: Literal["open_clip", "local"]


class BaseModelList(BaseModel):
    data: list[BaseModelOut]
    has_more: bool = False
    next_cursor: str | None = None
