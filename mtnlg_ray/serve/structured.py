"""Structured outputs: a request's output held to a JSON schema, a regex, a list of choices or a grammar.

The grammar library is llguidance (guidance-ai; the `guidance` backend of vLLM, and llama.cpp's
`%llguidance` grammars): a small Rust wheel that depends on nothing (xgrammar's requires torch,
transformers and triton), and computes each token mask on the fly from a token trie with an Earley
parser over a lazily built lexer, so a schema needs no ahead-of-time index over the vocabulary
(outlines-core builds one per regex, seconds for a large schema and vocabulary) and a mask costs
tens of microseconds. It reads JSON Schema, regexes, Lark and GBNF grammars, and names what it does
not support ("Unimplemented keys: ["uniqueItems"]"), which becomes the 400's message.

How a constraint travels:
    request body (`ResponseFormat`, `StructuredOutputs`: fields of schemas.py's requests)
    -> `GrammarSpec`: plain data (the schema as compact JSON text, the regex, the choices), checked
      once at the HTTP edge by `check` (the same compiler without a tokenizer: the unsupported
      feature named in a 400)
    -> SamplingParams.structured -> the Add message -> the engine process, where `GrammarCompiler`
      (one per engine, over the tokenizer's vocabulary) compiles a spec once (an LRU cache by spec)
      and gives each request a copy of the compiled matcher, its `Constraint`.
    Every step `mask_rows` sets the logits of the tokens a constrained row's grammar does not allow
    next to -inf (free rows of the batch are untouched); the request's stop tokens are allowed only
    where the grammar accepts, and `Constraint.advance` feeds it each sampled token.

The vocabulary table: each id's bytes as the tokenizer decodes them (`token_bytes`: SentencePiece's
byte-fallback pieces <0xNN> are that byte, its `▁` a space); special tokens (padding, end of
document, chat role markers) and ids beyond the tokenizer are marked special, so no grammar ever
allows them as text.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)

# Between JSON tokens: nothing, one space, or one or two line breaks and an indent of up to 20 (llama.cpp's
# JSON `space` rule). Bounded, so a weak model cannot spend its whole budget on blanks.
JSON_WHITESPACE = r"[ ]|\n{1,2}[ \t]{0,20}"
MAX_COMPILED = 64  # compiled grammars an engine keeps (LRU)


@dataclass(frozen=True)
class GrammarSpec:
    """One constraint as plain data (hashable: the compiled-grammar cache's key)."""

    kind: Literal["json", "regex", "choice", "grammar"]
    value: str | tuple[str, ...]  # json: the schema as compact JSON text; regex; grammar: Lark or GBNF; choice
    whitespace: str | None = None  # json: the pattern allowed between tokens; None: compact JSON

    @classmethod
    def json_schema(cls, schema: Any, whitespace: str | None = JSON_WHITESPACE) -> "GrammarSpec":
        """A JSON schema (an object, or its JSON text) as compact text, its key order kept (properties are
        generated in the schema's order): the same schema sent again shares one compiled grammar."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as err:
                raise UnsupportedGrammar(f"the JSON schema is not valid JSON ({err})") from None
        return cls("json", json.dumps(schema, separators=(",", ":")), whitespace)

    def grammar(self) -> str:
        """The llguidance grammar of this spec."""
        return _grammar(self)


class UnsupportedGrammar(ValueError):
    """A spec the grammar library cannot compile; the message names the feature or the error."""


@lru_cache(maxsize=256)
def _grammar(spec: GrammarSpec) -> str:
    from llguidance import LLMatcher, grammar_from

    if spec.kind == "json":
        options = {"whitespace_flexible": False} if spec.whitespace is None else {"whitespace_pattern": spec.whitespace}
        return LLMatcher.grammar_from_json_schema(spec.value, defaults=options)
    if spec.kind == "choice":  # a Lark rule of string literals (JSON escapes are Lark's)
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                 for c in spec.value))
    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.value)
    return grammar_from("grammar", spec.value)  # Lark, or GBNF converted to Lark


def describe(message: str, kind: str) -> str:
    """One line for a client from llguidance's error message."""
    if message.startswith("Unimplemented keys: "):
        try:
            keys = json.loads(message[len("Unimplemented keys: "):])
            return f"JSON Schema keyword{'s' if len(keys) > 1 else ''} not supported: {', '.join(keys)}"
        except json.JSONDecodeError:
            pass
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    detail = next((line[len("error: "):] for line in lines if line.startswith("error: ")), None)
    if detail is not None:  # a regex error (a regex spec, a schema's "pattern", a grammar's /.../)
        return f"regex: {detail}"
    what = {"json": "JSON schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}[kind]
    return f"{what}: {lines[0] if lines else message}"


def first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else message


@lru_cache(maxsize=256)
def check(spec: GrammarSpec) -> None:
    """Raise UnsupportedGrammar (naming the feature) unless llguidance compiles `spec` (no tokenizer needed)."""
    from llguidance import LLMatcher

    try:
        message = LLMatcher.validate_grammar(spec.grammar(), None)
    except ValueError as err:  # a schema that is not a JSON object or boolean
        message = str(err)
    if message and not message.startswith("WARNING"):
        raise UnsupportedGrammar(describe(message, spec.kind))


# ------------------------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    """As schemas.RequestBody (schemas.py imports these): unknown fields refused, no coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class JsonSchemaFormat(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="None: any JSON object")
    strict: bool | None = Field(None, description="accepted; the schema is always enforced")


class ResponseFormat(_Body):
    """OpenAI's response_format: free text, any JSON object, or JSON valid under a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _compiles(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only then")
        if (spec := self.spec()) is not None:
            check(spec)
        return self

    def spec(self) -> GrammarSpec | None:
        if self.type == "text":
            return None
        schema = self.json_schema.schema_ if self.json_schema is not None else None
        return GrammarSpec.json_schema({"type": "object"} if schema is None else schema)


class StructuredOutputs(_Body):
    """vLLM's structured_outputs: exactly one of json (a schema), regex, choice, grammar, json_object."""

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON schema (or its text)")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, description="Lark or GBNF (llama.cpp's EBNF)")
    json_object: bool | None = None
    disable_any_whitespace: bool = Field(False, description="JSON without whitespace between tokens")
    whitespace_pattern: str | None = Field(None, description=f"regex of JSON's whitespace (default "
                                           f"{JSON_WHITESPACE!r})")

    @model_validator(mode="after")
    def _one_constraint_that_compiles(self):
        given = [self.json_, self.regex, self.choice, self.grammar, self.json_object or None]
        if sum(v is not None for v in given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        check(self.spec())
        return self

    def spec(self) -> GrammarSpec:
        if self.regex is not None:
            return GrammarSpec("regex", self.regex)
        if self.choice is not None:
            return GrammarSpec("choice", tuple(self.choice))
        if self.grammar is not None:
            return GrammarSpec("grammar", self.grammar)
        whitespace = None if self.disable_any_whitespace else self.whitespace_pattern or JSON_WHITESPACE
        return GrammarSpec.json_schema({"type": "object"} if self.json_ is None else self.json_, whitespace)


# ------------------------------------------------------------------------------- engine process side
class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: each id's bytes, the special ids, a tokenize function."""

    def __init__(self, tokenizer, vocab_size: int):
        special = set(tokenizer.special_tokens.values()) | set(range(tokenizer.vocab_size, vocab_size))
        self.tokens = [b"" if i in special else tokenizer.token_bytes(i) for i in range(vocab_size)]
        self.special_token_ids = sorted(special)
        self.eos_token_id, self.bos_token_id = tokenizer.eod_id, None
        self._encode = tokenizer.encode

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._encode(text, parse_special=False)


class Constraint:
    """One request's grammar state: a copy of its spec's compiled matcher, advanced token by token."""

    def __init__(self, matcher, stop_ids: tuple[int, ...], eos: int):
        self.matcher, self.stop_ids, self.eos = matcher, list(stop_ids), eos
        self._stop_set = frozenset(stop_ids)

    def advance(self, token: int) -> None:
        """Feed a sampled token (a stop token ends the request: nothing to feed)."""
        if token not in self._stop_set and not self.matcher.consume_token(token):
            log.warning("structured output: token %d rejected: %s", token, first_line(self.matcher.get_error()))


class GrammarCompiler:
    """Compiles GrammarSpecs over one tokenizer's vocabulary of `vocab_size` ids (the model's). The
    llguidance tokenizer is built at the first constrained request, so free serving never pays for it."""

    def __init__(self, tokenizer, vocab_size: int, cache_size: int = MAX_COMPILED):
        self.tokenizer, self.vocab_size, self.cache_size = tokenizer, vocab_size, cache_size
        self._llg_tokenizer = None
        self._compiled: OrderedDict[GrammarSpec, Any] = OrderedDict()

    def _tokenizer(self):
        if self._llg_tokenizer is None:
            from llguidance import LLTokenizer, TokenizerWrapper

            vocab = _Vocabulary(self.tokenizer, self.vocab_size)
            self._llg_tokenizer = LLTokenizer(TokenizerWrapper(vocab), n_vocab=self.vocab_size)
        return self._llg_tokenizer

    def compiled(self, spec: GrammarSpec):
        """The compiled, never advanced matcher of `spec` (cached)."""
        from llguidance import LLMatcher, LLParserLimits

        matcher = self._compiled.get(spec)
        if matcher is None:  # errors without the grammar and parser state (the schema stays out of the logs)
            limits = LLParserLimits(verbose_errors=False)
            matcher = self._compiled[spec] = LLMatcher(self._tokenizer(), spec.grammar(), log_level=0, limits=limits)
            if matcher.is_error():  # checked at the edge: only a tokenizer-specific failure gets here
                log.warning("structured output: %s grammar failed to compile: %s", spec.kind,
                            first_line(matcher.get_error()))
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(spec)
        return matcher

    def constraint(self, spec: GrammarSpec, stop_ids: tuple[int, ...]) -> Constraint:
        """A fresh grammar state for one request that ends at any of `stop_ids`."""
        return Constraint(self.compiled(spec).deep_copy(), stop_ids, self.tokenizer.eod_id)


def mask_rows(logits: torch.Tensor, rows: list[int], constraints: list[Constraint]) -> None:
    """In place: set to -inf every logit of row rows[j] of logits (B, V) that constraints[j] does not allow
    next; the other rows are untouched.

    llguidance writes a bitmask per row, (B, ceil(V / 32)) int32, bit t of word t // 32 set when token
    t may come next; its EOS bit says the grammar accepts here, and becomes the request's stop tokens.
    A row left with nothing allowed (a matcher in an error state) allows the stop tokens: the request
    ends rather than runs free. The bits are unpacked in numpy and applied in one masked_fill_ over
    the batch: small torch ops (row indexing, per-row fills) would cost more than the masks.
    """
    B, V = logits.shape
    words = (V + 31) // 32
    bits = np.full((B, words), -1, dtype=np.int32)  # free rows: every token allowed
    base = bits.ctypes.data
    for i, c in zip(rows, constraints):
        c.matcher.unsafe_compute_mask_ptr(base + i * words * 4, words * 4)
    allowed = np.unpackbits(bits.view(np.uint8), axis=1, count=V, bitorder="little").view(bool)  # (B, V)
    at, eos = np.array(rows), np.array([c.eos for c in constraints])
    may_end = allowed[at, eos]  # (n,) the grammar accepts here
    allowed[at, eos] = False
    may_end |= ~allowed[at].any(1)  # or is stuck
    for j in np.flatnonzero(may_end):
        allowed[rows[j], constraints[j].stop_ids] = True
    logits.masked_fill_(torch.from_numpy(~allowed).to(logits.device), float("-inf"))
