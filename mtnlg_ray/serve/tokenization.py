"""How the server reads text into token ids, and vLLM's tokenization routes.

`Tokenization` is a mixin of the deployment class (app.py): it reads prompt text and chat messages
into token ids for the generation routes (the engine client validates the ids), and serves
    POST /tokenize         vLLM's body: {"prompt"} or {"messages"}; add_special_tokens, return_token_strs
    POST /detokenize       {"tokens"} -> {"prompt"}
    GET  /tokenizer_info   vLLM's: the tokenizer_config.json of this vocabulary (class, special tokens
                           and their ids, chat template, model max length)
Special tokens written in prompt text (every one the tokenizer has: `<|endoftext|>`, `<pad>`, `<unk>`,
the role markers) are read as those tokens, in prompts and in rendered chat templates alike;
`split_special_tokens: true` reads them as plain text. Our tokenizers add no BOS or EOS, so
`add_special_tokens` is accepted and changes nothing.
"""

from __future__ import annotations

from fastapi import Request

from mtnlg_ray.data.chat import check_messages, render_chat
from mtnlg_ray.serve.engine_client import outside_vocabulary
from mtnlg_ray.serve.ingress import APIError, api, body_doc
from mtnlg_ray.serve.responses import DetokenizeResponse, TokenizeResponse, TokenizerInfoResponse
from mtnlg_ray.serve.schemas import DetokenizeRequest, TokenizeRequest


# tokenizer_class: the algorithm's name (transformers' GPT2Tokenizer is the GPT-2 BPE we implement)
TOKENIZER_CLASSES = {"Tokenizer": "SentencePieceTokenizer", "GPT2BPETokenizer": "GPT2Tokenizer",
                     "HFTokenizer": "PreTrainedTokenizerFast"}


class Tokenization:
    """Mixin: needs `tok`, `chat_template`, `context`, `cfg`, `_body` and `_model_of` from the class."""

    def encode_text(self, text: str, split_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, parse_special=not split_special_tokens)

    def encode_messages(self, messages: list[dict], add_generation_prompt: bool, split_special_tokens: bool) -> list[int]:
        """The conversation through the chat template, then tokenized (400 naming `messages` on failure)."""
        try:
            check_messages(messages)
            text = render_chat(messages, add_generation_prompt, self.chat_template, **self.template_variables)
        except ValueError as err:  # TemplateError too: a template's own raise_exception
            raise APIError(400, str(err), param="messages", code="invalid_value")
        return self.encode_text(text, split_special_tokens)

    @property
    def template_variables(self) -> dict:
        """What transformers hands a chat template besides the messages: the special tokens by role."""
        eod = self.tok.id_to_piece(self.tok.eod_id)
        return {"eos_token": eod, "bos_token": "", "pad_token": self.tok.id_to_piece(self.tok.pad_id)}

    def truncate(self, ids: list[int], keep: int | None) -> list[int]:
        """The last `keep` prompt tokens (truncate_prompt_tokens; None: all). The prompt itself is
        validated by the engine client when it is submitted."""
        if keep is None:
            return ids
        if keep >= self.context:
            raise APIError(400, f"truncate_prompt_tokens={keep} must be less than the context of {self.context} "
                           f"tokens", param="truncate_prompt_tokens", code="invalid_value")
        return ids[-keep:]

    # ------------------------------------------------------------------------------------ routes
    @api.post("/tokenize", response_model=TokenizeResponse, tags=["tokenization"], openapi_extra=body_doc(TokenizeRequest))
    async def tokenize(self, request: Request):
        req: TokenizeRequest = await self._body(request, TokenizeRequest)
        self._model_of(req.model)
        if req.prompt is not None:
            ids = self.encode_text(req.prompt, req.split_special_tokens)
        else:
            msgs = [{"role": m.role, "content": m.text} for m in req.messages]
            ids = self.encode_messages(msgs, req.add_generation_prompt, req.split_special_tokens)
        strs = [self.tok.id_to_piece(i) for i in ids] if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.context, tokens=ids,
                                token_strs=strs).model_dump(exclude_none=True)

    @api.post("/detokenize", response_model=DetokenizeResponse, tags=["tokenization"],
              openapi_extra=body_doc(DetokenizeRequest))
    async def detokenize(self, request: Request):
        req: DetokenizeRequest = await self._body(request, DetokenizeRequest)
        self._model_of(req.model)
        if (message := outside_vocabulary(req.tokens, self.tok.vocab_size)) is not None:
            raise APIError(400, f"tokens: {message}", param="tokens", code="invalid_value")
        return {"prompt": self.tok.decode(req.tokens)}

    @api.get("/tokenizer_info", response_model=TokenizerInfoResponse, tags=["tokenization"])
    async def tokenizer_info(self, request: Request):
        self._auth(request)
        tok = self.tok
        specials = dict(sorted(tok.special_tokens.items(), key=lambda kv: kv[1]))
        named = {"eos_token": tok.eod_id, "pad_token": tok.pad_id, "unk_token": getattr(tok, "unk_id", None)}
        named = {k: tok.id_to_piece(i) for k, i in named.items() if i is not None and i >= 0}
        return {
            "tokenizer_class": TOKENIZER_CLASSES.get(type(tok).__name__, type(tok).__name__),
            "model_max_length": self.context,
            "vocab_size": tok.vocab_size,
            "bos_token": None, "add_bos_token": False, "add_eos_token": False,
            **named,
            "additional_special_tokens": [p for p in specials if p not in named.values()],
            "added_tokens_decoder": {str(i): {"content": p, "special": True} for p, i in specials.items()},
            "special_token_ids": specials,
            "chat_template": self.chat_template,
        }
