"""One error hierarchy for M-AI.

Every error carries an HTTP status and an OpenAI-style ``type`` so that the HTTP layer maps
it without a lookup table of its own, and a ``param`` naming the offending field when there
is one. Engine, actors and deployments raise these; nothing else crosses a layer.
"""

from __future__ import annotations


class MAIError(Exception):
    """Base of every error M-AI raises on purpose."""

    status_code: int = 500
    error_type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def to_dict(self) -> dict:
        """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.status_code,
            }
        }


class ConfigError(MAIError):
    """A configuration value is invalid; the message names the field, the value and the fix."""

    status_code = 400
    error_type = "invalid_request_error"


class InvalidRequestError(MAIError):
    """A request is malformed or asks for something the model cannot do."""

    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(MAIError):
    status_code = 401
    error_type = "authentication_error"


class NotFoundError(MAIError):
    status_code = 404
    error_type = "not_found_error"


class ModelNotFoundError(NotFoundError):
    """A request names a model that is not served (OpenAI: 404 ``model_not_found``)."""

    error_type = "invalid_request_error"

    def to_dict(self) -> dict:
        body = super().to_dict()
        body["error"]["code"] = "model_not_found"
        return body


class CapacityError(MAIError):
    """The queue is full; the client should retry after ``retry_after`` seconds."""

    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: float = 1.0, param: str | None = None):
        super().__init__(message, param=param)
        self.retry_after = retry_after


class EngineDeadError(MAIError):
    """The engine (or one of its tensor-parallel ranks), or another part a request needs,
    stopped; in-flight requests fail. ``retry_after``: when it is expected back (seconds;
    None: the server's ``serving.retry_after_s``)."""

    status_code = 503
    error_type = "service_unavailable"

    def __init__(self, message: str, *, param: str | None = None, retry_after: float | None = None):
        super().__init__(message, param=param)
        self.retry_after = retry_after


class ControlTimeoutError(EngineDeadError):
    """A tensor-parallel rank waited longer than the control channel's timeout for a step
    message from rank 0 (or rank 0 for its followers to take one): the replica is restarted."""


class CheckpointError(MAIError):
    """A checkpoint is missing, incomplete or corrupted."""

    status_code = 500
    error_type = "checkpoint_error"


class RequestCancelled(MAIError):
    """The request was cancelled (client disconnect or explicit abort)."""

    status_code = 499
    error_type = "cancelled"
