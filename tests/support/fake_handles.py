"""An actor handle over a plain object, for testing Ray callers without Ray:
``PlainHandle(obj).method.remote(...)`` returns what ``obj.method(...)`` returns (a coroutine
for an async method, which the caller awaits as it would an ObjectRef)."""

from __future__ import annotations

from typing import Any


class _Method:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class PlainHandle:
    def __init__(self, target: Any) -> None:
        self.target = target

    def __getattr__(self, name: str) -> _Method:
        return _Method(getattr(self.target, name))
