"""Fixtures of the load tests (``make test-load``; marked ``load``, not in the default run):
the session's local Ray + Serve, as in the integration and end-to-end tests."""

from __future__ import annotations

import pytest

from tests.integration import serve_harness


@pytest.fixture(scope="session")
def serve_cluster():
    cluster = serve_harness.acquire()
    yield cluster
    serve_harness.release()
