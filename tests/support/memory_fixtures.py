"""Small memory fixtures shared by the memory unit tests."""

from __future__ import annotations

import time

from engine.embedding.embedders import HashingEmbedder

# A window small enough that a few turns fold into summaries.
SMALL = {"episodic": {"window_tokens": 120, "episode_turns": 2, "fanout": 2, "summary_tokens": 60}}


class SlowEmbedder(HashingEmbedder):
    """Slow for everything but one-text calls (queries), to show absorbing runs aside."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def embed(self, texts):
        if len(texts) > 1 or (texts and not texts[0].endswith("?")):
            time.sleep(self.delay)
        return super().embed(texts)


def turn(text: str, answer: str = "Noted, thank you for telling me that.") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
