"""Configuration, read from the environment once, in `create_app` or the CLI, never at import."""

import os
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import platformdirs
from pydantic import Field, SecretStr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

ADMIN_TOKEN_CHARS = 32
ADMIN_TOKEN_KINDS = 8  # different characters: fewer is a token made by hand (`a` x 32), not drawn at random
# The async driver for each plain database scheme: `sqlite:///x.db` is what people write.
ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QUBAX_", populate_by_name=True, extra="ignore")

    data_dir: Path = Field(default_factory=lambda: Path(platformdirs.user_data_dir("qubax")))
    database_url: str | None = None
    redis_url: str | None = None  # shared limits for several nodes; without it, limits hold per process
    storage_url: str | None = None  # file:///path or s3://bucket/prefix; default: images/ in the data folder
    admin_token: SecretStr | None = None  # enables /admin and /metrics; at least ADMIN_TOKEN_CHARS long
    public_url: str | None = None
    # Host names (or `*.example.com` patterns), comma-separated, that requests may name in their Host
    # header; others are refused. Unset: any (without public_url, it is the host of image URLs).
    allowed_hosts: str | None = None
    # Addresses (or networks, comma-separated; `*` for any) of the proxies whose X-Forwarded-For and
    # X-Forwarded-Proto `qubax serve` believes. Unset: nobody's, the client is the connection's peer.
    forwarded_allow_ips: str | None = None
    # Signs image URLs; every node behind one public address must share it. Default: a file in data_dir.
    signing_secret: SecretStr | None = Field(default=None, min_length=32)
    image_ttl_seconds: int = Field(default=3600, gt=0)
    request_timeout_seconds: float = Field(default=300.0, gt=0)
    poll_interval_seconds: float = Field(default=0.5, gt=0)
    # With public_url set (see upstream_callbacks), BFL, fal and Replicate tasks call us back at it when they end
    # (`providers.callbacks`), and are polled only this often, for a callback that never comes.
    callback_poll_seconds: float = Field(default=15.0, gt=0)
    # Unset: callbacks only where public_url names a host the upstreams could reach (not localhost, a
    # private or loopback address, or a name without a dot); true or false decides it either way.
    upstream_callbacks: bool | None = None
    # Replicate's webhook signing secret (`whsec_...`, GET /v1/webhooks/default/secret): where set, its
    # callbacks must carry Replicate's signature too.
    replicate_webhook_secret: SecretStr | None = None
    sweep_interval_seconds: float = Field(default=60.0, gt=0)
    # Silence after which another node takes over a job or an idempotent request whose node died; the
    # node at work says it is alive four times as often.
    takeover_seconds: float = Field(default=20.0, gt=0)
    # Async jobs each node makes at once; unset: as many as its providers' concurrency caps let run
    # (`runner.capacity`), so that a node is not held below the caps the catalog sets.
    job_concurrency: int | None = Field(default=None, ge=1)
    job_poll_seconds: float = Field(default=1.0, gt=0)  # how often a node looks for jobs other nodes queued
    job_retention_days: float = Field(default=30.0, gt=0)  # how long an ended job (and its answer) is kept
    # Webhooks: hosts (or `*.example.com` patterns, comma-separated) that may be http, or resolve to
    # private or loopback addresses (others must be public https); seconds a target has to answer; the
    # pauses between tries of a failed delivery (the default spans 27 hours).
    webhook_allowed_hosts: str | None = None
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    # `5,300,1800` (or a JSON list); NoDecode: pydantic-settings would read it as JSON only, and crash.
    webhook_retry_seconds: Annotated[list[float], NoDecode] = Field(
        default=[5, 300, 1800, 7200, 18000, 36000, 36000], min_length=1
    )
    catalog: Path | None = None  # the operator's TOML catalog file
    breaker_failures: int = Field(default=5, ge=1)  # failures in a row that take a route out of rotation
    breaker_cooldown_seconds: float = Field(default=30.0, gt=0)
    log_format: Literal["text", "json"] = "text"
    access_log: bool = True
    trace_prompts: bool = False  # prompts on upstream spans, when traces are on (OTEL_EXPORTER_OTLP_ENDPOINT)
    log_prompts: bool = False  # prompts are the users' data: off the logs unless the operator asks

    # Upstream HTTP: seconds to connect, seconds of silence before an upstream is given up, seconds an
    # asynchronous upstream has to accept a submission before the next route gets it, connections
    # (unset: no cap of the pool's own; each provider's concurrency cap bounds its calls).
    upstream_connect_timeout_seconds: float = Field(default=10.0, gt=0)
    upstream_read_timeout_seconds: float = Field(default=120.0, gt=0)
    upstream_submit_timeout_seconds: float = Field(default=30.0, gt=0)
    upstream_connections: int | None = Field(default=None, ge=1)

    # Each client connection under `qubax serve` (`connection.GuardedConnection`): the request head's and
    # the URL's size, seconds to send a head and a body, connections open at once per server process
    # (unset: what its file-descriptor limit can hold, `connection.connection_bound`).
    max_header_bytes: int = Field(default=32 * 1024, ge=1024)
    max_url_bytes: int = Field(default=8 * 1024, ge=256)
    header_timeout_seconds: float = Field(default=10.0, gt=0)
    body_timeout_seconds: float = Field(default=60.0, gt=0)
    max_connections: int | None = Field(default=None, ge=1)
    max_upload_bytes: int = Field(default=100 * 1024 * 1024, ge=1024 * 1024)  # one edit's images, all told
    # Uploads decoded for their pixels (a Fill mask, a test key's picture): the most memory decoding one
    # may take (width x height x 4 bytes, 8 for 16 bits a sample; an upload past it is refused from its
    # header, whatever the route), and how many are decoded at once per process.
    max_decode_bytes: int = Field(default=128 * 1024 * 1024, ge=1024 * 1024)
    decode_concurrency: int = Field(default=2, ge=1)
    # Worker processes converting upstream images to the format and size asked (`pipeline.converter`);
    # unset: one for each core the server may use.
    convert_processes: int | None = Field(default=None, ge=1)

    # Per provider, by its registry name, from the provider's own variables (`ProviderVariables`):
    # its credential (BFL_API_KEY=key1,key2) and its base URL (QUBAX_BFL_BASE_URL).
    credentials: dict[str, SecretStr] = Field(default_factory=dict)
    base_urls: dict[str, str] = Field(default_factory=dict)

    @field_validator("admin_token", mode="before")
    @classmethod
    def long_admin_token(cls, value: Any) -> Any:
        """An empty token leaves the admin API off; a short one could be guessed, so it stops the start."""
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if text in (None, ""):
            return None
        if problem := admin_token_problem(str(text)):
            raise ValueError(problem)
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def host_wildcards(cls, value: str | None) -> str | None:
        """Starlette's `TrustedHostMiddleware` matches these, and takes `*` alone or as a `*.` prefix only."""
        for pattern in host_patterns(value):
            if pattern != "*" and "*" in pattern.removeprefix("*."):
                raise ValueError(f"{pattern!r}: a pattern must be a host name or like *.example.com")
        return value

    @field_validator("public_url")
    @classmethod
    def absolute_url(cls, value: str | None) -> str | None:
        """Every image link starts with it: without a scheme each one would be broken."""
        if not value:
            return None
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an absolute URL with its scheme, like https://images.example.com")
        return value

    @field_validator("webhook_retry_seconds", mode="before")
    @classmethod
    def comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            return orjson.loads(text) if text.startswith("[") else [part.strip() for part in text.split(",")]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, ProviderVariables(settings_cls), env_settings, dotenv_settings, file_secret_settings

    @property
    def resolved_database_url(self) -> str:
        if not self.database_url:
            return f"sqlite+aiosqlite:///{self.data_dir / 'qubax.db'}"
        scheme, separator, rest = self.database_url.partition("://")
        return ASYNC_DRIVERS.get(scheme, scheme) + separator + rest

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"


def admin_token_problem(token: str) -> str | None:
    """What makes `token` guessable, to follow `QUBAX_ADMIN_TOKEN: ` in a line; None when it is fit."""
    if len(token) < ADMIN_TOKEN_CHARS:
        return f"must be at least {ADMIN_TOKEN_CHARS} characters (e.g. `openssl rand -hex 32`)"
    if not token.strip() or len(set(token)) < ADMIN_TOKEN_KINDS:
        return (
            f"is blank or repetitive: it must have at least {ADMIN_TOKEN_KINDS} different characters, "
            "drawn at random (e.g. `openssl rand -hex 32`)"
        )
    return None


def host_patterns(text: str | None) -> list[str]:
    """A setting's comma-separated host names or shell-style patterns (`*.example.com`), lower case."""
    return [name.strip().lower() for name in (text or "").split(",") if name.strip()]


class ProviderVariables(PydanticBaseSettingsSource):
    """Each registered provider's own variables, so that a new provider needs no field here."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads everything at once

    def __call__(self) -> dict[str, Any]:
        from qubax.providers.registry import PROVIDERS  # the registry's modules need settings' types

        credentials = {
            name: os.environ[info.credential] for name, info in PROVIDERS.items() if info.credential in os.environ
        }
        base_urls = {
            name: os.environ[info.base_url_variable]
            for name, info in PROVIDERS.items()
            if os.environ.get(info.base_url_variable)
        }
        return {"credentials": credentials, "base_urls": base_urls}
