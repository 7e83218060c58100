"""Engine outputs -> OpenAI response objects: whole responses and streamed chunks, with usage and logprobs.

No HTTP here: the app turns these into JSON bodies or SSE events. A `Choice` gathers what one
engine request produced; `Renderer` knows the tokenizer (token strings for logprobs) and the
model name, and formats completions (`text_completion`) and chat (`chat.completion[.chunk]`).

Logprob token strings follow OpenAI and vLLM: a token's text, or `bytes:\\xNN...` when its bytes are
not whole UTF-8 characters (a byte-fallback piece of a multi-byte character), or the special token
itself (`<|endoftext|>`, which adds no text). `text_offset` counts characters of the returned text:
a character split over byte tokens is counted once it is complete, so offsets stay consistent with
the text for any prompt or output (chat's `bytes` carry the raw bytes).
"""

from __future__ import annotations

import codecs
import time
import uuid

from mtnlg_ray.serve.engine import Output
from mtnlg_ray.serve.responses import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse,
                                       ChatLogprobs, ChatMessageOut, CompletionChoice, CompletionLogprobs,
                                       CompletionResponse, DeltaMessage, PromptTokensDetails, TokenLogprob, TopLogprob,
                                       Usage)


class Choice:
    """One choice: its prompt, then the text, tokens and logprob entries the engine sent."""

    def __init__(self, index: int, prompt: list[int], prompt_index: int):
        self.index, self.prompt, self.prompt_index = index, prompt, prompt_index
        self.text: list[str] = []
        self.tokens: list[int] = []
        self.logprobs: list = []  # per token: None or (logprob, [(id, logprob), ...])
        self.prompt_logprobs: list | None = None
        self.finish_reason: str | None = None
        self.generated = 0
        self.cached = 0  # prompt tokens the prefix cache supplied
        self.started = False  # a chunk was sent (chat streams open with the role)
        self.offsets = TextOffsets()  # text_offset of the next streamed token

    def add(self, out: Output) -> None:
        self.text.append(out.text)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.token_id is not None:
            self.tokens.append(out.token_id)
            self.logprobs.append(out.logprob)
        self.generated = out.num_generated
        self.cached = out.num_cached_tokens
        if out.finished:
            self.finish_reason = out.finish_reason


def usage(choices: list[Choice]) -> Usage:
    """Prompt tokens count once per prompt (n choices share it); completion tokens per choice. Cached
    tokens: per prompt, the fewest any of its choices took from the prefix cache."""
    prompt = sum({c.prompt_index: len(c.prompt) for c in choices}.values())
    cached: dict[int, int] = {}
    for c in choices:
        cached[c.prompt_index] = min(cached.get(c.prompt_index, c.cached), c.cached)
    completion = sum(c.generated for c in choices)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(cached.values())))


class TextOffsets:
    """Character offset, in the decoded text, at which each next token starts (UTF-8 decoded
    incrementally: the bytes of a character split over tokens count when the character completes)."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pos = 0

    def advance(self, data: bytes) -> int:
        at = self.pos
        self.pos += len(self._decoder.decode(data))
        return at


def token_string(data: bytes, piece: str) -> str:
    """A logprob token as OpenAI writes it: its text, `bytes:\\xNN..` for bytes that are not whole UTF-8
    characters, or `piece` (the special token itself) when it adds no text."""
    if not data:
        return piece
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class Renderer:
    def __init__(self, tokenizer, model_name: str):
        self.tok, self.model = tokenizer, model_name
        self._tokens: dict[int, tuple[str, bytes]] = {}

    def token(self, token: int) -> tuple[str, bytes]:
        """(logprob string, the bytes it adds to the text) of one token id."""
        got = self._tokens.get(token)
        if got is None:
            data = self.tok.token_bytes(token)
            got = self._tokens[token] = (token_string(data, self.tok.id_to_piece(token)), data)
        return got

    def token_str(self, token: int) -> str:
        return self.token(token)[0]

    # ---------------------------------------------------------------------------- completions
    def completion_logprobs(self, tokens: list[int], entries: list, offsets: TextOffsets) -> CompletionLogprobs:
        lp = CompletionLogprobs()
        for t, e in zip(tokens, entries):
            s, data = self.token(t)
            lp.tokens.append(s)
            lp.token_logprobs.append(None if e is None else e[0])
            lp.top_logprobs.append(None if e is None else {self.token_str(i): v for i, v in e[1]})
            lp.text_offset.append(offsets.advance(data))
        return lp

    def completion(self, choices: list[Choice], echo: bool, logprobs: bool) -> CompletionResponse:
        out = []
        for c in choices:
            prefix = self.tok.decode(c.prompt) if echo else ""
            lp = None
            if logprobs:
                if echo:
                    lp = self.completion_logprobs(c.prompt + c.tokens, (c.prompt_logprobs or [None] * len(c.prompt))
                                                  + c.logprobs, TextOffsets())
                else:
                    lp = self.completion_logprobs(c.tokens, c.logprobs, TextOffsets())
            text = prefix + "".join(c.text)
            if lp is not None:  # a stop string cut the text short of the stop token's bytes
                lp.text_offset = [min(o, len(text)) for o in lp.text_offset]
            out.append(CompletionChoice(index=c.index, text=text, logprobs=lp, finish_reason=c.finish_reason))
        return CompletionResponse(model=self.model, choices=out, usage=usage(choices))

    def completion_chunk(self, rid: str, created: int, c: Choice, out: Output, echo: bool,
                         logprobs: bool) -> CompletionResponse:
        text, tokens, entries = out.text, [], []
        if echo and not c.started:
            text = self.tok.decode(c.prompt) + text
            tokens, entries = list(c.prompt), list(out.prompt_logprobs or [None] * len(c.prompt))
        c.started = True
        if out.token_id is not None:
            tokens.append(out.token_id)
            entries.append(out.logprob)
        lp = self.completion_logprobs(tokens, entries, c.offsets) if logprobs else None
        choice = CompletionChoice(index=c.index, text=text, logprobs=lp, finish_reason=out.finish_reason)
        return CompletionResponse(id=rid, created=created, model=self.model, choices=[choice])

    # ----------------------------------------------------------------------------------- chat
    def top(self, token: int, logprob: float) -> dict:
        s, data = self.token(token)
        return dict(token=s, logprob=logprob, bytes=list(data or s.encode("utf-8")))

    def chat_logprobs(self, tokens: list[int], entries: list) -> ChatLogprobs:
        content = [TokenLogprob(**self.top(t, e[0]), top_logprobs=[TopLogprob(**self.top(i, v)) for i, v in e[1]])
                   for t, e in zip(tokens, entries) if e is not None]
        return ChatLogprobs(content=content)

    def chat(self, choices: list[Choice], logprobs: bool) -> ChatCompletionResponse:
        out = [ChatChoice(index=c.index, message=ChatMessageOut(content="".join(c.text)),
                          logprobs=self.chat_logprobs(c.tokens, c.logprobs) if logprobs else None,
                          finish_reason=c.finish_reason) for c in choices]
        return ChatCompletionResponse(model=self.model, choices=out, usage=usage(choices))

    def chat_chunks(self, rid: str, created: int, c: Choice, out: Output, logprobs: bool) -> list[ChatCompletionChunk]:
        chunks = []
        if not c.started:  # OpenAI streams open each choice with the role
            c.started = True
            chunks.append(ChatChunkChoice(index=c.index, delta=DeltaMessage(role="assistant", content="")))
        if out.text or out.token_id is not None or out.finished:
            lp = None
            if logprobs and out.token_id is not None:
                lp = self.chat_logprobs([out.token_id], [out.logprob])
            delta = DeltaMessage(content=out.text) if out.text or not out.finished else DeltaMessage()
            chunks.append(ChatChunkChoice(index=c.index, delta=delta, logprobs=lp, finish_reason=out.finish_reason))
        return [ChatCompletionChunk(id=rid, created=created, model=self.model, choices=[ch]) for ch in chunks]


def new_id(prefix: str) -> tuple[str, int]:
    """(response id, created unix time) shared by every chunk of one streamed response."""
    return f"{prefix}-{uuid.uuid4().hex}", int(time.time())
