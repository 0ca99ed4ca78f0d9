"""Configuration, read from the environment once, in `create_app` or the CLI, never at import."""

from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def credential(env_name: str) -> SecretStr | None:
    """A provider credential read from the provider's own variable name (e.g. `BFL_API_KEY`)."""
    return Field(default=None, validation_alias=AliasChoices(env_name))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QUBAX_", populate_by_name=True, extra="ignore")

    data_dir: Path = Field(default_factory=lambda: Path(platformdirs.user_data_dir("qubax")))
    database_url: str | None = None
    redis_url: str | None = None  # shared limits for several nodes; without it, limits hold per process
    storage_url: str | None = None  # file:///path or s3://bucket/prefix; default: images/ in the data folder
    admin_token: SecretStr | None = None  # enables /admin and /metrics
    public_url: str | None = None
    # Signs image URLs; every node behind one public address must share it. Default: a file in data_dir.
    signing_secret: SecretStr | None = Field(default=None, min_length=32)
    image_ttl_seconds: int = Field(default=3600, gt=0)
    request_timeout_seconds: float = Field(default=300.0, gt=0)
    poll_interval_seconds: float = Field(default=0.5, gt=0)
    sweep_interval_seconds: float = Field(default=60.0, gt=0)
    catalog: Path | None = None  # the operator's TOML catalog file
    breaker_failures: int = Field(default=5, ge=1)  # failures in a row that take a route out of rotation
    breaker_cooldown_seconds: float = Field(default=30.0, gt=0)
    log_format: Literal["text", "json"] = "text"
    access_log: bool = True
    log_prompts: bool = False  # prompts are the users' data: off the logs unless the operator asks

    bfl_api_key: SecretStr | None = credential("BFL_API_KEY")
    openai_api_key: SecretStr | None = credential("OPENAI_API_KEY")
    together_api_key: SecretStr | None = credential("TOGETHER_API_KEY")
    fal_key: SecretStr | None = credential("FAL_KEY")
    replicate_api_token: SecretStr | None = credential("REPLICATE_API_TOKEN")

    bfl_base_url: str = "https://api.bfl.ai"
    openai_base_url: str = "https://api.openai.com/v1"
    together_base_url: str = "https://api.together.xyz/v1"
    fal_base_url: str = "https://queue.fal.run"
    replicate_base_url: str = "https://api.replicate.com/v1"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'qubax.db'}"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"
