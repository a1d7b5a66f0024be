"""Anthropic Messages request bodies (pydantic)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Block(_Open):
    """A content block: text, tool_use (assistant), tool_result (user); others are refused."""

    type: str = Field(max_length=64)
    text: str | None = None
    id: str | None = Field(None, max_length=256)
    name: str | None = Field(None, max_length=256)
    input: dict | None = None
    tool_use_id: str | None = Field(None, max_length=256)
    content: str | list["Block"] | None = None
    is_error: bool | None = None


class Message(_Open):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolDef(_Open):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    description: str | None = None
    input_schema: dict = Field(default_factory=lambda: {"type": "object"})


class ToolChoice(_Open):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, max_length=64)


class MessagesRequest(_Open):
    model: str = Field(max_length=256)
    max_tokens: int = Field(ge=1, le=2**31 - 1)
    messages: list[Message] = Field(min_length=1, max_length=4096)
    system: str | list[Block] | None = None
    stop_sequences: list[str] | None = Field(None, max_length=16)
    stream: bool | None = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    metadata: dict | None = None
