"""The chat template: one Jinja2 definition shared by fine-tuning (data/sft.py), serving
(/v1/chat/completions, /tokenize) and the terminal (`mtnlg chat`, `mtnlg generate --chat`).

A conversation is rendered with the tokenizer's role tokens, each message closed by <|end|>:

    <|system|>You are terse.<|end|><|user|>Hi<|assistant|>Hello!<|end|>

(no separators between messages; newlines inside content are kept). For generation the prompt ends
with `<|assistant|>` and decoding stops at `<|end|>`. `CHAT_TEMPLATE` is that rendering as a Jinja2
template in Hugging Face's form (`messages`, `add_generation_prompt`, `raise_exception`), rendered
as transformers' `apply_chat_template` renders it (sandboxed, trim_blocks, lstrip_blocks); its text is
then tokenized with special tokens read as such. A checkpoint may carry its own template
(`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`), and `mtnlg serve --chat-template`
overrides both. Labels are -100 on everything but assistant content and its closing <|end|>, so only
responses are learned.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from mtnlg_ray.errors import UserError

ROLES = ("system", "user", "assistant")
IGNORE = -100
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class TemplateError(ValueError):
    """A chat template that does not compile or fails on a conversation (its own raise_exception)."""


@lru_cache(maxsize=16)
def compile_template(source: str):
    """A Jinja2 template as transformers compiles chat templates; TemplateError if it does not parse."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(str(message))

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateError as err:
        raise TemplateError(f"chat template: {err}") from None


def check_messages(messages: list[dict]) -> None:
    """ValueError naming the message at fault (unknown role, content not a string)."""
    for i, msg in enumerate(messages):
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content: must be a string")


def render_chat(messages: list[dict], add_generation_prompt: bool = False, template: str | None = None,
                **variables) -> str:
    """The conversation as prompt text (`template`: Jinja2 source; None: CHAT_TEMPLATE)."""
    import jinja2

    try:
        return compile_template(template or CHAT_TEMPLATE).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except TemplateError:
        raise
    except jinja2.TemplateError as err:  # e.g. an undefined variable the template needs
        raise TemplateError(f"chat template: {err}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as err:
        raise TemplateError(f"chat template: {type(err).__name__}: {err}") from None  # e.g. 'a' + 1 in it


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False,
                template: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels (same length) for `messages` = [{"role": ..., "content": ...}, ...].

    Each message's ids are its part of the rendered text (the template renders a conversation's
    prefix as the prefix of its text); an assistant message's part starts with the generation prompt,
    which is masked, and the rest (content and closing <|end|>) is learned. With
    `add_generation_prompt` the generation prompt is appended (the serving prompt).
    Raises ValueError naming the message at fault.
    """
    check_messages(messages)
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, msg in enumerate(messages):
        text = render_chat(messages[: i + 1], template=template)
        if not text.startswith(done):
            raise TemplateError(f"chat template: the rendering of messages[:{i + 1}] does not start with that of "
                                f"messages[:{i}], so messages cannot be labelled one by one")
        part, head = text[len(done):], ""
        if msg["role"] == "assistant":
            head = render_chat(messages[:i], add_generation_prompt=True, template=template)[len(done):]
            head = head if part.startswith(head) else ""
        head_ids, body_ids = tokenizer.encode(head), tokenizer.encode(part[len(head):])
        ids += head_ids + body_ids
        labels += [IGNORE] * len(head_ids) + (body_ids if msg["role"] == "assistant" else [IGNORE] * len(body_ids))
        done = text
    if add_generation_prompt:
        gen = tokenizer.encode(render_chat(messages, add_generation_prompt=True, template=template)[len(done):])
        ids += gen
        labels += [IGNORE] * len(gen)
    return ids, labels


def encode_prompt_response(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """A {prompt, response} example as a one-turn chat: the prompt is masked, the response learned."""
    return encode_chat(tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])


def chat_stop_id(tokenizer) -> int:
    """The token that ends an assistant turn (the server stops generation on it)."""
    try:
        return tokenizer.token_id("<|end|>")
    except UserError:
        return tokenizer.eod_id


def load_chat_template(option: str | None = None, checkpoint_dir: str | Path | None = None) -> str:
    """The Jinja2 source in use: `option` (a file, or the template itself, as vLLM's --chat-template),
    else the checkpoint's own (chat_template.jinja, or tokenizer_config.json's chat_template), else
    CHAT_TEMPLATE. UserError if the file is missing or the template does not compile."""
    source = None
    if option:
        looks_inline = "{{" in option or "{%" in option
        path = Path(option).expanduser()
        if not looks_inline:
            if not path.is_file():
                raise UserError(f"{option}: no such chat template file")
            source = path.read_text(encoding="utf-8")
        else:
            source = option
    elif checkpoint_dir is not None:
        d = Path(checkpoint_dir)
        if (d / "chat_template.jinja").is_file():
            source = (d / "chat_template.jinja").read_text(encoding="utf-8")
        elif (d / "tokenizer_config.json").is_file():
            try:
                source = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
            except (json.JSONDecodeError, AttributeError):
                source = None
            source = source if isinstance(source, str) else None
    source = source or CHAT_TEMPLATE
    try:
        compile_template(source)
    except TemplateError as err:
        raise UserError(f"{option or checkpoint_dir}: {err}") from None
    return source
