"""Service settings, read from the environment with the prefix ``RETRAINER_`` (CONTRACT section 6).

Every setting has a type, a default (the embedded one) and a description; secrets are
``SecretStr`` so they never appear in logs or reprs. Standard AWS variables and Prefect's own
are honoured by their libraries and are not repeated here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from domain.errors import ConfigurationError
from domain.notification_spec import WebhookSpec

ENV_PREFIX = "RETRAINER_"
_DATABASE_SCHEMES = ("sqlite", "postgresql")
_ARTIFACT_SCHEMES = ("file", "s3")


def split_address(value: str) -> tuple[str, int]:
    """("HOST", PORT) from "HOST:PORT" ("[::1]:80" too); ValueError saying the expected form."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"must be HOST:PORT, e.g. 127.0.0.1:8080; port 0 takes a free one (got {value!r})")
    return host.strip("[]"), int(port)


class Settings(BaseSettings):
    """All of Retrainer's settings; `load_settings()` builds one from the environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    database_url: str = Field(
        default="sqlite:///./.retrainer/retrainer.db",
        description="SQLAlchemy URL of the metadata database: sqlite:///PATH or "
        "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB.",
    )
    artifact_root: str = Field(
        default="file://./.retrainer/artifacts",
        description="Where artifacts (datasets, checkpoints, models) live: file://PATH or s3://BUCKET/PREFIX.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="S3 endpoint for S3-compatible stores (MinIO: http://127.0.0.1:9000); unset means AWS.",
    )
    s3_region: str = Field(default="us-east-1", description="Region used to sign S3 requests.")
    s3_access_key_id: str | None = Field(
        default=None, description="S3 access key; unset means boto3's usual chain (AWS_ACCESS_KEY_ID, …)."
    )
    s3_secret_access_key: SecretStr | None = Field(
        default=None, description="S3 secret key, paired with s3_access_key_id."
    )
    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092", description="Comma-separated Kafka bootstrap servers."
    )
    kafka_topic: str = Field(default="retrainer.data-changes", description="Topic of data-change events.")
    kafka_dlq_topic: str = Field(default="", description="Dead-letter topic; empty means the event topic plus '.dlq'.")
    kafka_consumer_group: str = Field(default="retrainer", description="Kafka consumer group id.")
    decisions_topic: str = Field(
        default="retrainer.decisions",
        description="Topic the relay publishes decision events to (flows/relay.py); Kafka off (empty "
        "RETRAINER_KAFKA_BOOTSTRAP_SERVERS): events go to webhooks only.",
    )
    webhooks: list[WebhookSpec] = Field(
        default_factory=list,
        description="Webhooks for every pipeline's decision events, in addition to each spec's "
        '`notifications.webhooks`: a JSON list of {"url", "events", "secret_env"}, checked as the spec\'s are '
        "(domain/notification_spec.py); a URL a pipeline's spec names too is delivered to once.",
    )
    webhook_attempts: int = Field(default=5, ge=1, le=20, description="Tries of one webhook delivery before it fails.")
    webhook_timeout_seconds: float = Field(default=5.0, gt=0, description="Time one webhook try may take.")
    prefect_ui: bool = Field(
        default=True,
        description="`retrainer serve` starts its embedded Prefect server with Prefect's web UI (false: API only).",
    )
    prefect_ui_url: str = Field(
        default="",
        description="Base URL of the Prefect UI the dashboard's run pages link to; empty: Prefect's own "
        "PREFECT_UI_URL when set, else (under `retrainer serve` with prefect_ui) the embedded server's.",
    )
    pipelines_dir: Path = Field(
        default=Path("./pipelines"), description="Folder of pipeline specs, one YAML file per pipeline."
    )
    api_address: str = Field(default="127.0.0.1:8080", description="HOST:PORT of the HTTP API.")
    serving_address: str = Field(default="127.0.0.1:8081", description="HOST:PORT of the model server.")
    serving_grpc_address: str = Field(
        default="",
        description="HOST:PORT of the model server's OIP v2 gRPC service (beside its HTTP one); empty: no gRPC.",
    )
    ort_ops_library: str | None = Field(
        default=None,
        description="Path of Retrainer's ONNX Runtime norm and GELU kernels (ml/quantization/kernels.py); "
        "unset: the one `make` builds beside the package, if built; empty: off (ONNX Runtime's own kernels).",
    )
    health_address: str = Field(
        default="127.0.0.1:8083",
        description="HOST:PORT of /healthz and /metrics of `consume`, `triggers` and `rollout supervise`.",
    )
    serving_url: str = Field(
        default="",
        description="Base URL the canary controller reads the model server at; empty: http://SERVING_ADDRESS.",
    )
    serving_torch_threads: int = Field(
        default=1,
        ge=1,
        description="torch intra-op threads in the model server's process. 1 suits small models: the "
        "batcher already amortises each forward pass, and idle OpenMP threads spin on the cores the "
        "HTTP event loop needs. Raise it for large models.",
    )
    canary_poll_seconds: float = Field(
        default=2.0, gt=0, description="How often the canary controller looks at the step in progress."
    )
    api_key: SecretStr | None = Field(
        default=None, description="API key the CLI sends to the HTTP API (`retrainer trigger`)."
    )
    serving_require_key: bool = Field(
        default=False,
        description="The model server answers inference only with an API key that has the `infer` scope "
        "(feedback, stats and load always need their scopes).",
    )
    controller_api_key: SecretStr | None = Field(
        default=None,
        description="API key (scope `operate`) the canary controller sends to the model server; unset: the "
        "controller's process provisions its own (`retrainer-canary-controller`) in the metadata database.",
    )
    home_dir: Path = Field(
        default=Path("./.retrainer"), description="Folder for embedded state (SQLite, local artifacts, Prefect)."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Minimum level of log lines."
    )
    log_format: Literal["json", "console"] = Field(
        default="json", description="json: one JSON object per line; console: for people at a terminal."
    )
    connect_timeout_seconds: float = Field(
        default=5.0, gt=0, description="How long to wait for a backing service before giving up."
    )
    run_max_resubmits: int = Field(
        default=1,
        ge=0,
        description="How many times a run whose Prefect flow run crashed (its process or worker died) is "
        "submitted again as a new flow run, resuming from its stored checkpoint, before it ends `failed`.",
    )
    # ge=30: Prefect's minimum, a flow beats no faster whatever it is told (flows/reconcile.py)
    run_heartbeat_s: int = Field(
        default=180, ge=30, description="Seconds between heartbeats of the flows Retrainer launches."
    )
    run_heartbeat_misses: int = Field(
        default=3, ge=2, description="Heartbeats a RUNNING flow run may miss before it is taken for dead."
    )
    run_start_timeout_s: int = Field(
        default=600,  # about the heartbeat silence (180 s x 3): noticed on the scale of a run lost while running
        ge=60,  # several of a worker's polls (every 10 s) and a process start
        description="Seconds a flow run may stay PENDING (a worker took it), or SCHEDULED past its time, "
        "before the reconciler takes it for lost (its worker died while starting it), cancels it and "
        "submits the run again; keep it above the longest wait for a free worker your pools allow.",
    )
    ddp_nnodes: int = Field(
        default=1, ge=1, description="Machines in a DDP training job when the spec's distributed.nnodes is unset."
    )
    ddp_node_rank: int = Field(
        default=0, ge=0, description="This machine's rank in a DDP job when the spec's distributed.node_rank is unset."
    )
    ddp_rdzv_endpoint: str = Field(
        default="",
        description="HOST:PORT where a several-machine DDP job's ranks meet (node 0) when the spec's "
        "distributed.rdzv_endpoint is unset; empty: one machine, a free local port.",
    )

    def __hash__(self) -> int:
        # settings key caches (retrainer/wiring.py); the webhooks' lists cannot be hashed, and leaving
        # them out keeps equal settings hashing equal
        return hash(tuple(value for name, value in self.__dict__.items() if name != "webhooks"))

    @property
    def model_server_url(self) -> str:
        """Where the model server answers: `serving_url`, else http:// + `serving_address` (0.0.0.0 → 127.0.0.1)."""
        if self.serving_url:
            return self.serving_url.rstrip("/")
        host, _, port = self.serving_address.rpartition(":")
        if host in ("0.0.0.0", "", "[::]", "::"):  # noqa: S104 - a wildcard bind is reached on loopback
            host = "127.0.0.1"
        return f"http://{host}:{port}"

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, value: str) -> str:
        scheme = urlsplit(value).scheme.split("+", 1)[0]
        if scheme not in _DATABASE_SCHEMES:
            raise ValueError(f"must start with sqlite:/// or postgresql+psycopg:// (got scheme {scheme or 'none'!r})")
        return value

    @field_validator("artifact_root")
    @classmethod
    def _artifact_scheme(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in _ARTIFACT_SCHEMES:
            raise ValueError(f"must be file://PATH or s3://BUCKET/PREFIX (got {value!r})")
        if parts.scheme == "s3" and not parts.netloc:
            raise ValueError(f"s3:// needs a bucket, e.g. s3://retrainer/artifacts (got {value!r})")
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint_scheme(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError(f"must be an http:// or https:// URL (got {value!r})")
        return value

    @field_validator("api_address", "serving_address", "health_address")
    @classmethod
    def _address(cls, value: str) -> str:
        split_address(value)
        return value

    @field_validator("ddp_rdzv_endpoint", "serving_grpc_address")
    @classmethod
    def _optional_address(cls, value: str) -> str:
        if value:
            split_address(value)
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> Settings:
        if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
            raise ValueError("RETRAINER_S3_ACCESS_KEY_ID and RETRAINER_S3_SECRET_ACCESS_KEY must be set together")
        if not self.kafka_dlq_topic:
            object.__setattr__(self, "kafka_dlq_topic", f"{self.kafka_topic}.dlq")
        if not self.prefect_ui_url and os.environ.get("PREFECT_UI_URL"):  # Prefect's own setting, if set
            object.__setattr__(self, "prefect_ui_url", os.environ["PREFECT_UI_URL"])
        if self.prefect_ui_url and urlsplit(self.prefect_ui_url).scheme not in ("http", "https"):
            raise ValueError(
                f"RETRAINER_PREFECT_UI_URL must be an http:// or https:// URL (got {self.prefect_ui_url!r})"
            )
        return self


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment (plus explicit overrides), or one ConfigurationError that
    names each bad variable and what is wrong with it."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except SettingsError as e:  # a list or mapping setting that is not JSON: say which and the form
        raise ConfigurationError(
            f"{e}: a setting that is a list must be JSON, e.g. RETRAINER_WEBHOOKS="
            '\'[{"url": "https://hooks.example.com/x", "events": ["*"], "secret_env": "HOOK_SECRET"}]\''
        ) from e
    except ValidationError as e:
        problems = []
        for err in e.errors():
            field, *inside = err["loc"] or ("",)  # inside a list setting: RETRAINER_WEBHOOKS[0].url
            name = f"{ENV_PREFIX}{str(field).upper()}" if field else "settings"
            name += "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in inside)
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"{name}: {message}")
        raise ConfigurationError("; ".join(problems)) from e
