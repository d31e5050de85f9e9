"""A small HTTP client of a running M-AI server for ``m-ai chat``: one server-side session,
answers streamed as Server-Sent Events. It needs only httpx (not the ``openai`` package)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx


class ChatError(Exception):
    """The server refused or failed a request; the message is the server's."""


class ChatClient:
    """Talks to ``url`` (e.g. http://127.0.0.1:8000) as one conversation."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        system_prompt: str | None = None,
        sampling: dict[str, Any] | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.model = model
        self.system_prompt = system_prompt
        self.sampling = {k: v for k, v in (sampling or {}).items() if v is not None}
        self.session_id: str | None = None

    def connect(self) -> str:
        """Pick the model (the first served one unless given) and start a session."""
        if self.model is None:
            models = self._json("GET", "/v1/models")["data"]
            if not models:
                raise ChatError("the server serves no model")
            self.model = models[0]["id"]
        self.reset()
        return self.model

    def reset(self) -> None:
        """Forget the conversation: delete the session and start a new one."""
        if self.session_id is not None:
            try:
                self._json("DELETE", f"/v1/sessions/{self.session_id}")
            except ChatError:
                pass  # already gone
        body = {"system_prompt": self.system_prompt} if self.system_prompt else {}
        self.session_id = self._json("POST", "/v1/sessions", json=body)["id"]

    def send(self, text: str) -> Iterator[str]:
        """Send one user turn; yield the answer's text as it streams."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": text}],
            "session_id": self.session_id,
            "stream": True,
            **self.sampling,
        }
        with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                raise ChatError(_error_message(response))
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise ChatError(event["error"].get("message", "the stream failed"))
                for choice in event.get("choices", []):
                    content = choice.get("delta", {}).get("content")
                    if content:
                        yield content

    def close(self) -> None:
        self.http.close()

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ChatError(f"cannot reach {self.http.base_url}: {exc}") from None
        if response.status_code >= 400:
            raise ChatError(_error_message(response))
        return response.json()


def _error_message(response: httpx.Response) -> str:
    try:
        return f"{response.status_code}: {response.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code}: {response.text[:200]}"


__all__ = ["ChatClient", "ChatError"]
