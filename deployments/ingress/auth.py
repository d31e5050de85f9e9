"""API keys: ``Authorization: Bearer <key>`` -> tenant.

Keys are configured as sha256 hex digests (``serving.api_keys``), so the config never holds a
usable secret. With no keys configured authentication is off and every caller is the
``default`` tenant (the ingress logs a warning at start).
"""

from __future__ import annotations

import hmac

from cluster.config.serving import ServingConfig, hash_api_key
from cluster.errors import AuthenticationError

DEFAULT_TENANT = "default"


class ApiKeyAuth:
    """Resolves the tenant of a request from its ``Authorization`` header."""

    def __init__(self, serving: ServingConfig) -> None:
        self._keys = dict(serving.api_keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def tenant(self, authorization: str | None) -> str:
        """The caller's tenant; ``AuthenticationError`` (401) without a valid key."""
        if not self._keys:
            return DEFAULT_TENANT
        if not authorization:
            raise AuthenticationError(
                "no API key: send the header 'Authorization: Bearer <key>'", param="authorization"
            )
        scheme, _, key = authorization.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationError(
                "the Authorization header must be 'Bearer <key>'", param="authorization"
            )
        digest = hash_api_key(key)
        tenant = None
        for known, owner in self._keys.items():  # compare all, in constant time each
            if hmac.compare_digest(known, digest):
                tenant = owner
        if tenant is None:
            raise AuthenticationError("the API key is not valid", param="authorization")
        return tenant


__all__ = ["ApiKeyAuth", "DEFAULT_TENANT"]
