"""Serving job config: the model, the engine's capacity, HTTP limits, Serve autoscaling."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mtnlg_ray.config.base import Section


# -------------------------------------------------------------------------------------- serving
class ReplicaAutoscalingConfig(Section):
    """Ray Serve autoscaling_config (validated here: Serve ignores misspelled keys)."""

    min_replicas: int = Field(1, ge=0, description="0 lets the deployment scale to zero when idle")
    max_replicas: int = Field(1, gt=0)
    target_ongoing_requests: float = Field(8, gt=0, description="ongoing requests per replica the autoscaler aims at")
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)

    @model_validator(mode="after")
    def _range(self) -> "ReplicaAutoscalingConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas={self.max_replicas} < min_replicas={self.min_replicas}")
        return self


class SpeculativeConfig(Section):
    """Speculative decoding by n-gram prompt lookup (vLLM's `speculative_config` with method "ngram"): the
    tokens that followed the latest n-gram's earlier occurrence in the prompt + output are verified
    in one forward; the output is what decoding without it gives (greedy) or distributed alike."""

    method: Literal["ngram"] = "ngram"
    num_speculative_tokens: int = Field(4, gt=0, description="tokens proposed per step (k)")
    prompt_lookup_max: int | None = Field(None, gt=0, description="longest n-gram matched; None: prompt_lookup_min, "
                                          "else 4")
    prompt_lookup_min: int | None = Field(None, gt=0, description="shortest n-gram matched; None: prompt_lookup_max")
    disable_by_batch_size: int | None = Field(None, gt=0, description="no speculation in steps that decode more "
                                              "rows than this (a padded (B, k+1) forward costs more at large B)")

    @model_validator(mode="after")
    def _ngram_range(self) -> "SpeculativeConfig":
        if self.prompt_lookup_max is None:
            self.prompt_lookup_max = self.prompt_lookup_min or 4
        if self.prompt_lookup_min is None:
            self.prompt_lookup_min = self.prompt_lookup_max
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min={self.prompt_lookup_min} > prompt_lookup_max={self.prompt_lookup_max}")
        return self


class ServeConfig(Section):
    """One OpenAI-compatible deployment: the model, the engine's KV-cache pool, Serve's limits."""

    checkpoint: str = Field(description="native checkpoint, Ray Train run directory, or GPT-2 directory")
    model_name: str = Field("mtnlg", min_length=1, description="the `model` clients send; others get 404 "
                            "(--served-model-name)")
    api_key: str | None = Field(None, repr=False, description="clients send `Authorization: Bearer <key>`; "
                                "None: $MTNLG_API_KEY in the replica, else no key (--api-key)")
    chat_template: str | None = Field(None, description="Jinja2 chat template: a file, or the template itself; "
                                      "None: the checkpoint's, else the built-in one (--chat-template)")
    host: str = Field("127.0.0.1", description="HTTP host (mtnlg serve; a Serve config sets http_options)")
    port: int = Field(8000, ge=0, lt=65536)
    max_batch_slots: int = Field(8, gt=0, description="sequences decoded together (KV-cache rows; --max-num-seqs)")
    max_context: int | None = Field(None, gt=1, description="tokens per slot; None: the model's max_seq_len "
                                    "(--max-model-len)")
    max_waiting: int = Field(64, ge=0, description="engine queue bound beyond the slots")
    max_ongoing_requests: int = Field(32, gt=0, description="requests Serve sends one replica at a time")
    max_queued_requests: int = Field(64, ge=-1, description="requests queued per caller beyond that; -1: no bound")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After of 503 answers when overloaded")
    max_body_bytes: int = Field(1_000_000, gt=0, description="larger request bodies get 413")
    num_cpus: float = Field(1.0, ge=0, description="per replica")
    num_gpus: float = Field(0.0, ge=0, description="per replica")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    health_check_period_s: float = Field(10.0, gt=0, description="Serve calls check_health this often")
    graceful_shutdown_timeout_s: float = Field(5.0, ge=0, description="on shutdown (SIGTERM, Ctrl-C, a scale-down) "
                                               "a replica's in-flight requests get this long to finish")
    autoscaling: ReplicaAutoscalingConfig = Field(default_factory=ReplicaAutoscalingConfig)
    enable_prefix_caching: bool = Field(True, description="reuse the KV blocks of prompt prefixes computed for "
                                        "earlier requests (outputs unchanged)")
    prefix_cache_blocks: int | None = Field(None, gt=0, description="16-token KV blocks the prefix cache keeps "
                                            "per replica; None: half the tokens of the KV-cache rows")
    prefix_affinity_routing: bool = Field(True, description="send requests whose prompts start alike to the same "
                                          "replica, where their prefix is cached (serve/router.py); false: Serve's "
                                          "default router")
    speculative: SpeculativeConfig | None = Field(None, description="n-gram speculative decoding; None: off")
    lora_adapters: dict[str, str] = Field(default_factory=dict, description="LoRA fine-tune runs (or checkpoints) "
                                          "served unmerged beside the base model, by the `model` name clients send "
                                          "(--lora-modules name=path)")
    max_loras: int = Field(4, gt=0, description="LoRA adapters one replica holds; loading one more at runtime "
                           "unloads the least recently used idle one (--max-loras)")
    quantization: Literal["none", "int8"] = Field("none", description="int8: decode with int8 weights (per output "
                                                  "channel, CPU; model/quantize.py); none: float (--quantization)")

    @property
    def engine_prefix_blocks(self) -> int | None:
        """The engine's prefix_cache_blocks: 0 when caching is off, None for the default size."""
        return self.prefix_cache_blocks if self.enable_prefix_caching else 0

    @model_validator(mode="after")
    def _adapters_fit(self) -> "ServeConfig":
        if len(self.lora_adapters) > self.max_loras:
            raise ValueError(f"lora_adapters: {len(self.lora_adapters)} adapters exceed max_loras={self.max_loras}")
        for name in self.lora_adapters:
            if not name or name == self.model_name:
                raise ValueError(f"lora_adapters: adapter name {name!r} must be non-empty and differ from "
                                 f"model_name={self.model_name!r}")
        return self

    @model_validator(mode="after")
    def _engine_holds_ongoing(self) -> "ServeConfig":
        held = self.max_batch_slots + self.max_waiting
        if self.max_ongoing_requests > held:
            raise ValueError(f"max_ongoing_requests={self.max_ongoing_requests} exceeds what one replica's engine "
                             f"holds (max_batch_slots + max_waiting = {held})")
        return self


class ServeJob(Section):
    """`mtnlg serve`: one OpenAI-compatible deployment of a checkpoint on Ray Serve."""

    serve: ServeConfig
