"""OpenAI-compatible request and response bodies (pydantic v2).

Requests are strict: unknown fields are refused (a typo is an error, not a silent default),
strings are not coerced to numbers, NaN/inf are refused, and every range is checked here, so
the server answers 400 naming the field (`param`) instead of failing later. Fields that need
the model (max_tokens vs the context, token ids vs the vocabulary) are checked by the app.
Extensions beyond OpenAI follow vLLM: top_k, repetition_penalty, stop_token_ids, ignore_eos,
truncate_prompt_tokens, add_special_tokens, structured_outputs (beside OpenAI's response_format:
structured.py holds both bodies and refuses what its grammar library cannot enforce); /tokenize
and /detokenize bodies are vLLM's. Special tokens written in prompt text are read as those tokens
(as vLLM); `split_special_tokens: true` (transformers' name) reads the text as preprocessing read
the corpus. `describe_error` turns a pydantic error into (field path, one-line message) for the
server's 400s and the CLI's flags alike. The response bodies are in responses.py.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mtnlg_ray.serve.sampling import SamplingParams
from mtnlg_ray.serve.structured import GrammarSpec, ResponseFormat, StructuredOutputs

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20
MAX_CHOICES = 16  # n
MAX_PROMPTS = 64  # prompts in one /v1/completions body
MAX_TOKENS_LIMIT = 1_000_000  # absurd values fail here; the real bound is the model's context
UNION_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}  # pydantic union-branch names in error locations


class RequestBody(BaseModel):
    """Base of every request body: unknown fields refused, no coercion, no NaN/inf."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(RequestBody):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(RequestBody):
    """Sampling fields shared by completions and chat (None = the OpenAI default)."""

    model: str
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    temperature: float | None = Field(None, ge=0, le=100, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="-1 or 0: no top-k")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_STRINGS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    truncate_prompt_tokens: int | None = Field(None, ge=1, description="keep only the last N prompt tokens")
    split_special_tokens: bool = Field(False, description="read special tokens written in the prompt as plain "
                                       "text (as preprocessing reads a corpus) instead of as those tokens")
    user: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    @field_validator("stop", mode="after")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences (got {len(stops)})")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences must have 1 to {MAX_STOP_CHARS} characters")
        return v

    @field_validator("logit_bias", mode="after")
    @classmethod
    def _bias(cls, v):
        for key, val in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids (got {key!r})")
            if not -100 <= val <= 100:
                raise ValueError(f"values must be in [-100, 100] (got {val} for token {key})")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        if self.structured_outputs is not None and self.response_format is not None and self.response_format.spec():
            raise ValueError("give response_format or structured_outputs, not both")
        return self

    @property
    def grammar_spec(self) -> GrammarSpec | None:
        """The output's constraint (structured.py), None for free text."""
        fmt = self.structured_outputs or self.response_format
        return None if fmt is None else fmt.spec()

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling_params(self, max_tokens: int, default_stop_ids: tuple[int, ...], logprobs: int | None,
                        prompt_logprobs: bool = False, choice: int = 0) -> SamplingParams:
        """Engine parameters of one choice; choice j of a seeded request uses seed + j. A structured output
        keeps the default stop tokens even with ignore_eos: its grammar decides where it may end."""
        spec = self.grammar_spec
        stop_ids = tuple(self.stop_token_ids or ()) + (() if self.ignore_eos and spec is None else default_stop_ids)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k, top_p=1.0 if self.top_p is None else self.top_p,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            seed=None if self.seed is None else (self.seed + choice) % 2**63,
            stop=self.stops, stop_token_ids=stop_ids, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            structured=spec,
        )


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0, le=MAX_TOKENS_LIMIT)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=1, description="only 1 (= n) is supported")
    suffix: None = Field(None, description="not supported")
    add_special_tokens: bool = Field(True, description="vLLM's: add the tokenizer's BOS/EOS (ours add none)")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("must not be an empty list")
            if not isinstance(v[0], int) and len(v) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request (got {len(v)})")
            if all(isinstance(p, list) for p in v) and any(not p for p in v):
                raise ValueError("token-id lists must not be empty")
        ok = isinstance(v, str) or (isinstance(v, list) and (
            all(isinstance(p, str) for p in v) or all(isinstance(p, int) and not isinstance(p, bool) for p in v)
            or all(isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in v)))
        if not ok:
            raise ValueError("must be a string, a list of strings, a list of token ids, or a list of token-id lists")
        return v

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(RequestBody):
    type: Literal["text"]
    text: str


class ChatMessage(RequestBody):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT, description="None: up to the context")
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_special_tokens: bool = Field(False, description="vLLM's: add BOS/EOS beyond the template (ours add none)")

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: only allowed when logprobs is true")
        return self

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict]:
        return [{"role": m.role, "content": m.text} for m in self.messages]


class TokenizeRequest(RequestBody):
    """vLLM's two /tokenize bodies in one: `prompt` (text) or `messages` (rendered by the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = Field(None, description="vLLM's: add BOS/EOS (ours add none)")
    return_token_strs: bool = Field(False, description="also return each token's string (its vocabulary piece)")
    split_special_tokens: bool = Field(False, description="special tokens written in the text are plain text")

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_TOKENS_LIMIT)


class LoadLoraAdapterRequest(RequestBody):
    """vLLM's /v1/load_lora_adapter body: serve a LoRA fine-tune run's adapters as model `lora_name`."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1, description="a LoRA fine-tune run directory or checkpoint on the server")


class UnloadLoraAdapterRequest(RequestBody):
    """vLLM's /v1/unload_lora_adapter body (`lora_int_id` is accepted and ignored, as names identify adapters)."""

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


def describe_error(err: ValidationError) -> tuple[str | None, str]:
    """(dotted field path or None, one-line message) of a request's first validation error."""
    e = err.errors()[0]
    parts = [str(p) for p in e["loc"] if isinstance(p, int) or (p.isidentifier() and p.islower() and p not in UNION_TAGS)]
    param = ".".join(parts)
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown field"
    elif e["type"] == "missing":
        msg = "required field is missing"
    elif isinstance(e.get("input"), (int, float, str, bool)) and "got" not in msg:
        msg = f"{msg} (got {json.dumps(e['input'])[:80]})"
    return param or None, f"{param}: {msg}" if param else msg
