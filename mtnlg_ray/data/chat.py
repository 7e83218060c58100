"""The chat template: one definition shared by fine-tuning (data/sft.py) and serving (/v1/chat/completions).

A conversation is rendered with the tokenizer's role tokens, each message closed by <|end|>:

    <|system|>You are terse.<|end|><|user|>Hi<|assistant|>Hello!<|end|>

(no separators between messages; newlines inside content are kept). For generation the prompt ends
with `<|assistant|>` and decoding stops at `<|end|>`. Labels are -100 on everything but assistant
content and its closing <|end|>, so only responses are learned.
"""

from __future__ import annotations

from mtnlg_ray.errors import UserError

ROLES = ("system", "user", "assistant")
IGNORE = -100


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and labels (same length) for `messages` = [{"role": ..., "content": ...}, ...].

    With `add_generation_prompt`, `<|assistant|>` is appended (the serving prompt).
    Raises ValueError naming the message at fault (unknown role, content not a string).
    """
    end = tokenizer.token_id("<|end|>")
    ids: list[int] = []
    labels: list[int] = []
    for i, msg in enumerate(messages):
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content: must be a string")
        head = [tokenizer.token_id(f"<|{role}|>")]
        body = tokenizer.encode(content) + [end]
        ids += head + body
        labels += [IGNORE] * len(head) + (body if role == "assistant" else [IGNORE] * len(body))
    if add_generation_prompt:
        ids.append(tokenizer.token_id("<|assistant|>"))
        labels.append(IGNORE)
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
