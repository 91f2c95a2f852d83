"""The validated configuration as frozen dataclasses (mirrors conf/schema.json).

Durations are seconds (float) here; the schema accepts "10s"/"1h" strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ServerConfig:
    max_body_bytes: int
    max_header_bytes: int
    idle_connection_timeout_s: float
    body_timeout_s: float
    drain_timeout_s: float
    auto_flush_streaming: bool
    max_messages: int
    max_client_buffer_bytes: int
    max_connections: int = 0
    trusted_proxies: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RedisConfig:
    endpoint: str
    cache_endpoint: str
    timeout_ms: int
    failure_policy: str
    max_connections: int


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    max_clients: int
    connect_timeout_s: float
    stall_timeout_s: int
    default_timeout_ms: int
    max_timeout_ms: int
    max_error_body_bytes: int
    lease_grace_s: float
    lease_ttl_s: float
    retry_max_attempts: int
    retry_base_delay_ms: int
    retry_max_delay_ms: int
    retry_after_max_s: float
    circuit_window: int
    circuit_window_s: float
    circuit_failure_ratio: float
    circuit_min_samples: int


@dataclass(frozen=True, slots=True)
class AnthropicConfig:
    access_token: str
    api_url: str
    allowed_models: tuple[str, ...]
    max_tokens_to_sample: int
    # anthropic-beta values clients may send ("*": any).
    allowed_betas: tuple[str, ...] = ("*",)
    # (model pattern, max_tokens cap), first match wins; others get max_tokens_to_sample.
    max_tokens_caps: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class OpenAIConfig:
    access_token: str
    org_id: str
    api_url: str
    allowed_models: tuple[str, ...]
    # n above this is lowered to it (the reference: 1).
    max_choices: int = 1


@dataclass(frozen=True, slots=True)
class FireworksConfig:
    access_token: str
    api_url: str
    allowed_models: tuple[str, ...]
    starcoder_community_single_tenant_percent: int
    starcoder_enterprise_single_tenant_percent: int


@dataclass(frozen=True, slots=True)
class GoogleConfig:
    access_token: str
    api_url: str
    allowed_models: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SourcegraphEmbeddingsConfig:
    access_token: str
    api_url: str


@dataclass(frozen=True, slots=True)
class ProvidersConfig:
    anthropic: AnthropicConfig
    openai: OpenAIConfig
    fireworks: FireworksConfig
    google: GoogleConfig
    sourcegraph_embeddings: SourcegraphEmbeddingsConfig


@dataclass(frozen=True, slots=True)
class EmbeddingsConfig:
    allowed_models: tuple[str, ...]
    openai_dimensions: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FlaggingConfig:
    max_tokens_to_sample_flagging_limit: int
    allowed_prompt_patterns: tuple[str, ...]
    blocked_prompt_patterns: tuple[str, ...]
    request_blocking_enabled: bool
    prompt_token_blocking_limit: int
    prompt_token_flagging_limit: int
    response_token_blocking_limit: int
    flagged_model_names: tuple[str, ...]
    flagged_prompt_recorder_ttl: float


@dataclass(frozen=True, slots=True)
class ActorsConfig:
    sources: tuple[str, ...]
    allow_anonymous: bool
    static_file: str
    static_file_optional: bool
    concurrency_limit_percentage: float
    concurrency_limit_interval: float
    local_cache_ttl: float
    sources_sync_interval: float
    sources_cache_ttl: float
    dotcom_api_url: str
    dotcom_access_token: str
    dotcom_client_id: str
    dotcom_actor_cooldown: float
    subscription_actor_cooldown: float
    identifiers_to_log_for: tuple[str, ...]
    attribution_enabled: bool


@dataclass(frozen=True, slots=True)
class EventsConfig:
    sink: str
    file: str
    spool_dir: str
    buffer_size: int
    batch_size: int
    flush_interval_ms: int
    bigquery_project_id: str
    bigquery_dataset: str
    bigquery_table: str
    bigquery_api_url: str
    bigquery_create_if_missing: bool

    @property
    def resolved_sink(self) -> str:
        if self.sink != "auto":
            return self.sink
        return "bigquery" if self.bigquery_project_id else "jsonl"


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    trace_policy: str
    otlp_endpoint: str
    otlp_protocol: str
    otlp_headers: str
    otlp_compression: str
    otlp_timeout_ms: int
    otlp_batch_size: int
    otlp_queue_size: int
    otlp_delay_ms: int
    sentry_dsn: str
    log_level: str
    access_log: bool
    slack_webhook_url: str
    notify_thresholds: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Config:
    host: str
    port: int
    processes: int
    environment: str
    diagnostics_secret: str
    server: ServerConfig
    redis: RedisConfig
    upstream: UpstreamConfig
    providers: ProvidersConfig
    embeddings: EmbeddingsConfig
    flagging: FlaggingConfig
    actors: ActorsConfig
    events: EventsConfig
    telemetry: TelemetryConfig
    # Where relative paths in the config are resolved from.
    base_dir: str = "."
    demo: bool = False
