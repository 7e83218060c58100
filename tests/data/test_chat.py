"""The chat template: Jinja2 rendered as transformers renders it, the ids and labels fine-tuning learns,
a checkpoint's own template, a custom one, special tokens written in messages."""

from __future__ import annotations

import json

import pytest

from mtnlg_ray.data import chat
from mtnlg_ray.errors import UserError

MESSAGES = [{"role": "system", "content": "be terse"}, {"role": "user", "content": "alpha\nbeta"},
            {"role": "assistant", "content": "gamma delta"}, {"role": "user", "content": "again?"}]
# A template of another shape (Zephyr-like: newlines, the generation prompt is "<|assistant|>\n")
OTHER = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def test_template_renders_as_transformers_renders_it():
    from transformers.utils.chat_template_utils import render_jinja_template

    for gen in (False, True):
        ours = chat.render_chat(MESSAGES, add_generation_prompt=gen)
        rendered = render_jinja_template([MESSAGES], chat_template=chat.CHAT_TEMPLATE, add_generation_prompt=gen)
        theirs = rendered[0][0] if isinstance(rendered, tuple) else rendered[0]
        assert ours == theirs
    assert chat.render_chat(MESSAGES[:2], True) == "<|system|>be terse<|end|><|user|>alpha\nbeta<|end|><|assistant|>"


def test_ids_are_the_rendered_text_tokenized_and_only_replies_are_learned(tiny_tokenizer):
    tok = tiny_tokenizer
    for template in (None, OTHER):
        ids, labels = chat.encode_chat(tok, MESSAGES, add_generation_prompt=True, template=template)
        assert ids == tok.encode(chat.render_chat(MESSAGES, True, template))
        learned = [i for i, lab in zip(ids, labels) if lab != chat.IGNORE]
        reply = chat.render_chat(MESSAGES[:3], template=template)[len(chat.render_chat(MESSAGES[:2], True, template)):]
        assert learned == tok.encode(reply) and tok.decode(learned) == "gamma delta<|end|>" + ("\n" if template else "")


def test_special_tokens_written_in_a_message_are_read_as_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    msgs = [{"role": "user", "content": "a<|endoftext|>b"}]
    ids, _ = chat.encode_chat(tok, msgs)
    assert tok.eod_id in ids and ids == tok.encode("<|user|>a<|endoftext|>b<|end|>")


def test_checkpoint_template_option_and_errors(tmp_path):
    assert chat.load_chat_template(None, tmp_path) == chat.CHAT_TEMPLATE  # none in the directory: built in
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": OTHER}))
    assert chat.load_chat_template(None, tmp_path) == OTHER  # a transformers tokenizer_config.json's
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert chat.load_chat_template(None, tmp_path) == "{{ messages[0]['content'] }}"  # chat_template.jinja wins
    (tmp_path / "mine.jinja").write_text(OTHER)
    assert chat.load_chat_template(str(tmp_path / "mine.jinja"), tmp_path) == OTHER  # the option wins
    assert chat.load_chat_template(OTHER, tmp_path) == OTHER  # the template itself, as vLLM accepts
    with pytest.raises(UserError, match="no such chat template file"):
        chat.load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(UserError, match="chat template"):
        chat.load_chat_template("{% for m in messages %}")
    with pytest.raises(ValueError, match=r"messages\[1\].role: unknown role 'robot'"):
        chat.encode_chat(None, [MESSAGES[0], {"role": "robot", "content": "x"}])
    with pytest.raises(chat.TemplateError, match="no robots"):
        chat.render_chat(MESSAGES, template="{{ raise_exception('no robots') }}")
