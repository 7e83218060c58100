"""Preprocessing job config: corpus, cleaning, tokenizer, packing."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mtnlg_ray.config.base import Section


# ----------------------------------------------------------------------------------------- data
class CorpusConfig(Section):
    """One corpus: the built-in stdlib sources, or text / JSONL / Parquet files (paths, dirs, globs)."""

    kind: Literal["stdlib", "text", "jsonl", "parquet"] = "stdlib"
    paths: list[str] = Field(default_factory=list, description="files, directories or globs; any pyarrow.fs URI")
    text_mode: Literal["file", "line", "paragraph"] = "file"
    text_field: str = Field("text", description="JSONL field / Parquet column holding the document")
    max_files: int | None = Field(None, gt=0, description="read at most this many files (sorted order)")

    @model_validator(mode="after")
    def _paths_needed(self) -> "CorpusConfig":
        if self.kind != "stdlib" and not self.paths:
            raise ValueError(f"kind={self.kind} needs at least one entry in paths")
        return self


class CleanConfig(Section):
    """Normalisation, length filter, exact and MinHash/LSH near-duplicate removal."""

    min_chars: int = Field(64, ge=0)
    max_chars: int = Field(200_000, gt=0)
    exact_dedup: bool = True
    near_dedup: bool = True
    shingle_size: int = Field(5, gt=0, description="words per shingle")
    num_perm: int = Field(128, gt=0)
    bands: int = Field(16, gt=0, description="LSH bands; rows per band = num_perm / bands")
    threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity counted as a duplicate")
    max_bad_fraction: float = Field(0.05, ge=0, le=1)

    @field_validator("bands")
    @classmethod
    def _bands_divide(cls, v: int, info) -> int:
        p = info.data.get("num_perm")
        if p is not None and p % v:
            raise ValueError(f"must divide num_perm={p} (got {v})")
        return v


class TokenizerConfig(Section):
    """Train a SentencePiece model on a sample of the cleaned corpus, or load `path`."""

    path: str | None = None
    model_type: Literal["bpe", "unigram", "char"] = "bpe"
    vocab_size: int = Field(4096, gt=0, description="pieces of a bpe or unigram model; a char model ignores it "
                            "(one piece per character kept by character_coverage, plus specials and byte pieces)")
    byte_fallback: bool = True
    character_coverage: float = Field(
        0.9995, gt=0, le=1, description="share of the sample's characters that get a piece of their own; the rarest "
        "rest become byte pieces (byte_fallback) or <unk>. SentencePiece's default; 1.0 keeps every character")
    sample_docs: int = Field(2000, gt=0, description="documents sampled for training")
    max_sentence_length: int = Field(
        8192, ge=4, description="UTF-8 bytes per training sentence; longer documents are cut at word starts into "
        "several sentences, so all of their text is trained on (at least 4: the longest UTF-8 character)")


class PackConfig(Section):
    """Tokenize on Ray Data tasks or an actor pool (the tokenizer loaded once per worker process or
    actor), EOD after each document, pack into rows of seq_len + 1 ids (data/shards.py: `pack`)."""

    seq_len: int = Field(256, gt=0, description="rows hold seq_len + 1 token ids")
    val_fraction: float = Field(0.02, ge=0, lt=1, description="documents sent to val, by content hash")
    rows_per_shard: int = Field(4096, gt=0)
    num_actors: int = Field(2, gt=0, description="tokenize + pack tasks (or actors) running at a time")
    compute: Literal["tasks", "actors"] = Field(
        "tasks", description="tasks: reused Ray worker processes (faster start); actors: a Ray Data actor pool")


class PreprocessJob(Section):
    """`mtnlg preprocess`: corpus -> cleaned, deduplicated, tokenized, packed dataset directory."""

    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    val_corpus: CorpusConfig | None = Field(None, description="explicit validation corpus (replaces val_fraction)")
    clean: CleanConfig = Field(default_factory=CleanConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    pack: PackConfig = Field(default_factory=PackConfig)
    output_dir: str = "data_out/stdlib"
    seed: int = 1234
