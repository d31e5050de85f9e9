"""``serving.migration``: resuming a stream on another model replica when its replica dies.

When the model replica that generates a stream dies (its process is killed, its node is lost),
the ingress resumes the request on another replica (or the restarted one) with the prompt plus
the tokens the client already has, and the client's stream goes on with no token missing or
repeated (greedy decoding: identical to a stream that was never interrupted).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class MigrationConfig(BaseModel):
    """``serving.migration`` (see the module docstring and docs/deployment.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(
        True, description="Resume a stream on another replica when its replica dies mid-stream; "
        "off: the stream ends with a typed 503 error event."
    )
    max_tries: int = Field(
        2, ge=1, le=10, description="Times one request may be resumed; the next replica death ends it "
        "with the 503."
    )
    max_tokens: int = Field(
        2048, ge=0, description="Most output tokens a request may have sent (all its choices) and "
        "still be resumed: the new replica computes the prompt plus these again."
    )
    wait_s: float = Field(
        10.0, gt=0, le=600, description="How long the ingress waits, per resumption, for a replica "
        "to take the request and send its first new token; past it the stream ends with the 503."
    )

    @model_validator(mode="after")
    def _useful(self) -> MigrationConfig:
        if self.enabled and self.max_tokens == 0:
            raise ValueError(
                f"max_tokens={self.max_tokens} with enabled=true resumes only streams that have sent "
                f"nothing yet; set max_tokens >= 1 (default 2048), or enabled: false to turn "
                f"migration off"
            )
        return self


__all__ = ["MigrationConfig"]
