"""The serving engine in this process, for the terminal: `mtnlg generate` and `mtnlg chat`.

The same `Engine` the server steps in its engine process (sampling, incremental detokenization, stop
tokens), here with one row, stepped in the caller's thread, its text printed as it comes. Sampling
values are checked by the server's request schema (`schemas.CompletionRequest`): a value the server
answers with a 400 is refused here in one line naming the flag (exit 2). Prompt text is read as the
server reads it (special tokens written in it are those tokens), and chat goes through the
checkpoint's chat template (data/chat.py).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Iterator, TextIO

from pydantic import ValidationError

from mtnlg_ray.data.chat import chat_stop_id, load_chat_template, render_chat
from mtnlg_ray.errors import ConfigError, UserError
from mtnlg_ray.serve.sampling import SamplingParams
from mtnlg_ray.serve.schemas import CompletionRequest, describe_error

log = logging.getLogger(__name__)


def check_sampling(max_tokens: int | None, temperature: float | None = None, top_p: float | None = None,
                   top_k: int | None = None, seed: int | None = None) -> CompletionRequest:
    """The flags as a server request, validated by its schema; ConfigError naming the flag.
    `max_tokens` None: up to the context."""
    body = {"model": "local", "prompt": "", "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
            "top_k": top_k, "seed": seed}
    try:
        req = CompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as err:
        param, message = describe_error(err)
        flag = "--" + (param or "").replace("_", "-")
        raise ConfigError(f"{flag}{message[len(param):]}" if param else message) from None
    if max_tokens is None:
        req.max_tokens = None
    elif req.max_tokens < 1:
        raise ConfigError(f"--max-tokens: must be at least 1 (got {req.max_tokens})")
    return req


class Session:
    """A checkpoint loaded for the terminal: its tokenizer, a one-row engine, its chat template."""

    def __init__(self, checkpoint: str, device: str = "cpu", chat_template: str | None = None):
        from mtnlg_ray.api import from_pretrained
        from mtnlg_ray.model.generate import use_decode_layout
        from mtnlg_ray.serve.engine import Engine

        tok, model = from_pretrained(checkpoint, device)
        if tok is None:
            raise UserError(f"{checkpoint}: has no tokenizer, so text prompts cannot be encoded")
        self.tok = tok
        use_decode_layout(model)  # the LM head's fast layout for decode steps (CPU)
        self.engine = Engine(model, max_slots=1, decode=tok.decode)
        self.context = self.engine.max_context
        self.template = load_chat_template(chat_template, Path(tok.path).parent)
        self.end_of_turn = chat_stop_id(tok)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = render_chat(messages, True, self.template, eos_token=self.tok.id_to_piece(self.tok.eod_id))
        return self.tok.encode(text)

    def budget(self, prompt_len: int, max_tokens: int | None) -> int:
        """`max_tokens` (None: all the room left), capped with a warning where the prompt leaves less
        room in the context."""
        room = self.context - prompt_len
        if room < 1:
            raise UserError(f"the prompt has {prompt_len} tokens but the context is {self.context} tokens "
                            f"(at most {self.context - 1} leave room to generate)")
        if max_tokens is None:
            return room
        if max_tokens > room:
            log.warning("--max-tokens %d capped at %d: the prompt has %d of the context's %d tokens", max_tokens,
                        room, prompt_len, self.context)
        return min(max_tokens, room)

    def params(self, req: CompletionRequest, max_tokens: int, stop_ids: tuple[int, ...]) -> SamplingParams:
        temperature = 0.0 if req.temperature is None else req.temperature  # the terminal's default: greedy
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=req.top_k,
                              top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop_token_ids=stop_ids)

    def stream(self, ids: list[int], params: SamplingParams) -> Iterator[str]:
        """The generated text piece by piece (aborted if the caller stops early, e.g. on Ctrl-C)."""
        rid = self.engine.add(ids, params)
        done = False
        try:
            while not done:
                for out in self.engine.step():
                    if out.text:
                        yield out.text
                    done = done or out.finished
        finally:
            if not done:
                self.engine.abort(rid)


def generate(checkpoint: str, prompt: str, req: CompletionRequest, chat: bool = False,
             system: str | None = None, out: TextIO | None = None) -> None:
    """`mtnlg generate`: the prompt and its continuation (`chat`: the assistant's reply only), streamed."""
    out = out or sys.stdout
    s = Session(checkpoint)
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids, stops = s.chat_ids(messages), (s.end_of_turn, s.tok.eod_id)
    else:
        ids, stops = s.tok.encode(prompt), (s.tok.eod_id,)
    if not ids:
        raise UserError("--prompt: encodes to no tokens")
    params = s.params(req, s.budget(len(ids), req.max_tokens), stops)
    if not chat:
        out.write(prompt)
    for text in s.stream(ids, params):
        out.write(text)
        out.flush()
    out.write("\n")


def chat(checkpoint: str, req: CompletionRequest, system: str | None = None, stdin: TextIO | None = None,
         out: TextIO | None = None) -> None:
    """`mtnlg chat`: read a message per line, stream the reply; the history is kept until `/reset`;
    end of input (Ctrl-D) leaves; Ctrl-C stops the reply being written. With a terminal, a `> ` prompt
    and readline editing; without one (piped input), the replies alone, one after another."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    s = Session(checkpoint)
    interactive = stdin.isatty() and out.isatty()
    if interactive:
        import readline  # noqa: F401 - line editing and history for input()
        print(f"chatting with {checkpoint} ({s.context} tokens of context); /reset clears the history, "
              f"Ctrl-D leaves", file=out)
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    while True:
        try:
            line = input("> ") if interactive else stdin.readline()
        except EOFError:
            line = ""
        if not line:  # end of input
            if interactive:
                print(file=out)
            return
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            history = list(base)
            print("(history cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = s.chat_ids(history)
        while len(ids) >= s.context and len(history) > len(base) + 1:  # forget the oldest turns that do not fit
            del history[len(base): len(base) + 2]
            ids = s.chat_ids(history)
        try:
            params = s.params(req, s.budget(len(ids), req.max_tokens), (s.end_of_turn, s.tok.eod_id))
        except UserError as err:  # this message alone fills the context: say so, keep chatting
            print(f"error: {err}", file=sys.stderr)
            history.pop()
            continue
        reply = []
        try:
            for text in s.stream(ids, params):
                reply.append(text)
                out.write(text)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        out.write("\n")
        out.flush()
        history.append({"role": "assistant", "content": "".join(reply)})
