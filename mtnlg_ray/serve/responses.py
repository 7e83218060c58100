"""OpenAI-compatible response bodies (pydantic v2), the shapes the server writes: completions and
chat completions (whole and streamed chunks), usage with cached prompt tokens, logprobs, the
/tokenize and /detokenize answers, /v1/models, and the error object (`error_body`). The request
bodies, which the server validates, are in schemas.py.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ResponseBody(BaseModel):
    """Base of every response body."""

    model_config = ConfigDict(extra="forbid")


class ErrorInfo(ResponseBody):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(ResponseBody):
    error: ErrorInfo


class PromptTokensDetails(ResponseBody):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class Usage(ResponseBody):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(ResponseBody):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class ChoiceBody(ResponseBody):
    """What every choice carries beside its text, message or delta."""

    index: int
    logprobs: Any = None  # CompletionLogprobs or ChatLogprobs
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"; None while streaming


class CompletionChoice(ChoiceBody):
    text: str
    logprobs: CompletionLogprobs | None = None


class TopLogprob(ResponseBody):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(ResponseBody):
    content: list[TokenLogprob] = Field(default_factory=list)


class ChatMessageOut(ResponseBody):
    role: Literal["assistant"] = "assistant"
    content: str


class DeltaMessage(ResponseBody):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChoice(ChoiceBody):
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None


class ChatChunkChoice(ChoiceBody):
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None


class GenerationResponse(ResponseBody):
    """What completions, chat completions and their stream chunks share (each narrows id, object, choices)."""

    id: str
    object: str
    created: int = Field(default_factory=lambda: int(time.time()))  # Unix seconds
    model: str
    choices: list
    usage: Usage | None = None


class CompletionResponse(GenerationResponse):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ChatCompletionResponse(GenerationResponse):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ChatCompletionChunk(GenerationResponse):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class TokenizeResponse(ResponseBody):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(ResponseBody):
    prompt: str


class TokenizerInfoResponse(ResponseBody):
    """vLLM's /tokenizer_info: the tokenizer_config.json a transformers tokenizer of this vocabulary has."""

    model_config = ConfigDict(extra="allow")
    tokenizer_class: str


class VersionResponse(ResponseBody):
    version: str


class ModelCard(ResponseBody):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "mtnlg"
    root: str | None = None  # a LoRA adapter's path (as vLLM)
    parent: str | None = None  # a LoRA adapter's base model
    max_model_len: int


class ModelList(ResponseBody):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    """The OpenAI error object: {"error": {"message", "type", "param", "code"}}."""
    return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code)).model_dump()
