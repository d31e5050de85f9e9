"""Where a refused live update is shown to an operator besides the replica's log.

A model replica that refuses its ``user_config`` (``LLMServer.reconfigure``) records why in
Ray's internal key-value store (the GCS), under its application and deployment; the ingress
reads it for ``GET /health`` (``"status": "degraded"`` with the reason) without calling the
replica, whose request queue may be long. A later update that applies clears it, and so
does a new replica before its first ``reconfigure``.
"""

from __future__ import annotations

from cluster.logging_setup import get_logger

log = get_logger("deployments.live_config_status")

NAMESPACE = "m-ai"


def _key(app_name: str, deployment: str) -> bytes:
    return f"live-config-refused/{app_name}/{deployment}".encode()


def publish_refusal(app_name: str, deployment: str, reason: str | None) -> None:
    """Record (``reason``) or clear (None) the refusal of this deployment's live update."""
    try:
        from ray.experimental import internal_kv

        if not internal_kv._internal_kv_initialized():
            return  # no Ray (a plain test of the class)
        if reason is None:
            internal_kv._internal_kv_del(_key(app_name, deployment), namespace=NAMESPACE)
        else:
            internal_kv._internal_kv_put(
                _key(app_name, deployment), reason.encode(), overwrite=True, namespace=NAMESPACE
            )
    except Exception as exc:  # the report is a convenience: never fail the replica for it
        log.warning(f"could not record the live configuration status: {exc!r}")


def read_refusal(app_name: str, deployment: str) -> str | None:
    """The reason the deployment's replicas refused their live update, or None."""
    try:
        from ray.experimental import internal_kv

        value = internal_kv._internal_kv_get(_key(app_name, deployment), namespace=NAMESPACE)
    except Exception:
        return None
    return value.decode() if value else None


__all__ = ["publish_refusal", "read_refusal"]
