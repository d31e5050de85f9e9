"""The text the tiny checkpoint's tokenizer is trained on, generated from templates.

No corpus is downloaded or shipped: a seeded ``random.Random`` fills templates with the word
lists of ``engine/data/tiny_corpus_words.txt``, so the same seed always gives the same lines
(and so the same tokenizer). The mix imitates what a chat model sees: conversation, questions
and answers, numbers, a little code and JSON, and some accented Latin, CJK and emoji, rare
enough that many of those characters are left to byte fallback, as in Llama 2.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

WORDS_FILE = Path(__file__).parents[1] / "data" / "tiny_corpus_words.txt"


@lru_cache(maxsize=1)
def word_lists() -> dict[str, tuple[str, ...]]:
    """The lists of ``tiny_corpus_words.txt`` by name (``*_lines`` lists hold whole lines)."""
    lists: dict[str, list[str]] = {}
    current: list[str] | None = None
    name = ""
    for raw in WORDS_FILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]") and " " not in line:
            name = line[1:-1]
            current = lists.setdefault(name, [])
        elif current is not None:
            current.extend([line] if name.endswith("_lines") else line.split())
    return {key: tuple(values) for key, values in lists.items()}


class _Writer:
    """Template filling with one seeded random source."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.words = word_lists()

    def pick(self, name: str) -> str:
        return self.rng.choice(self.words[name])

    def number(self) -> str:
        kind = self.rng.randrange(6)
        if kind == 0:
            return str(self.rng.randrange(10))
        if kind == 1:
            return str(self.rng.randrange(10, 1000))
        if kind == 2:
            return f"{self.rng.randrange(1, 100_000):,}"
        if kind == 3:
            return f"{self.rng.uniform(0, 1000):.2f}"
        if kind == 4:
            return str(self.rng.randrange(1900, 2040))
        return f"{self.rng.randrange(1, 100)}%"

    def sentence(self) -> str:
        subject = self.rng.choice(
            [self.pick("names"), f"the {self.pick('adjectives')} {self.pick('nouns')}"]
        )
        verb = self.pick("verbs")
        verb = self.rng.choice(
            [verb + "s", verb + "ed", "will " + verb, "can " + verb, "did not " + verb]
        )
        tail = self.rng.choice(
            [
                f"the {self.pick('nouns')}",
                f"a {self.pick('adjectives')} {self.pick('nouns')} {self.pick('adverbs')}",
                f"{self.number()} {self.pick('units')}",
                f"the {self.pick('nouns')} of {self.pick('names')}",
                f"{self.pick('nouns')} and {self.pick('nouns')}",
            ]
        )
        end = self.rng.choice([".", ".", ".", "!", "?", "..."])
        text = f"{subject} {verb} {tail}{end}"
        return text[0].upper() + text[1:]

    # One method per kind of line; each yields one or more training lines.

    def chat(self) -> list[str]:
        topic = self.pick("topics")
        user = self.rng.choice(
            [
                f"Can you help me with {topic}?",
                f"What is the best way to learn {topic}?",
                f"Explain {topic} to a {self.pick('adjectives')} student.",
                f"I need advice about my {self.pick('nouns')}.",
                f"Write a short poem about the {self.pick('nouns')}.",
                f"Summarize our conversation about {topic}, please.",
            ]
        )
        assistant = self.rng.choice(
            [
                f"Of course! Here is a {self.pick('adjectives')} overview of {topic}.",
                f"Sure, {self.pick('names')}. {self.sentence()}",
                "I'm sorry, but I don't have enough information to answer that.",
                f"Great question! First, {self.sentence().lower()}",
                f"Here are {self.rng.randrange(2, 8)} tips: start small, be {self.pick('adjectives')}, and practice daily.",
            ]
        )
        lines = [f"User: {user}", f"Assistant: {assistant}"]
        if self.rng.random() < 0.2:
            system = f"You are a {self.pick('adjectives')} and {self.pick('adjectives')} assistant."
            lines = ["[INST] <<SYS>>", system, "<</SYS>>", "", f"{user} [/INST] {assistant} "]
        return lines

    def question_answer(self) -> list[str]:
        kind = self.rng.randrange(4)
        if kind == 0:
            country, city = self.pick("countries_cities_lines").split("|")
            return [
                f"Q: What is the capital of {country}?",
                f"A: The capital of {country} is {city}.",
            ]
        if kind == 1:
            a, b = self.rng.randrange(1000), self.rng.randrange(1000)
            op, value = self.rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
            return [f"Q: What is {a} {op} {b}?", f"A: {a} {op} {b} = {value}."]
        if kind == 2:
            n = self.rng.randrange(1, 60)
            return [
                f"How many minutes are in {n} hours?",
                f"There are {n * 60} minutes in {n} hours.",
            ]
        return [f"Why does the {self.pick('nouns')} {self.pick('verbs')}?", self.sentence()]

    def numbers(self) -> list[str]:
        r = self.rng
        return [
            r.choice(
                [
                    f"Date: {r.randrange(1990, 2030)}-{r.randrange(1, 13):02d}-{r.randrange(1, 29):02d} at {r.randrange(24):02d}:{r.randrange(60):02d}",
                    f"Total: ${r.randrange(1, 5000)}.{r.randrange(100):02d} (tax {r.randrange(5, 25)}%)",
                    f"Call +1 555 {r.randrange(1000, 10000)} or +44 20 {r.randrange(1000, 10000)} {r.randrange(1000, 10000)}.",
                    f"Version {r.randrange(10)}.{r.randrange(30)}.{r.randrange(100)} was released in {r.randrange(2000, 2030)}.",
                    f"The temperature was {r.randrange(-20, 45)} degrees and {r.randrange(100)}% humidity.",
                    f"Order #{r.randrange(10_000, 1_000_000)}: {r.randrange(1, 20)} x {self.pick('nouns')} = {self.number()}",
                ]
            )
        ]

    def code(self) -> list[str]:
        name, arg = self.pick("code_names"), self.pick("code_names")
        n = self.rng.randrange(1, 100)
        kind = self.rng.randrange(5)
        if kind == 0:
            return [
                f"def compute_{name}({arg}, limit={n}):",
                f'    """Return the {name} of {arg}."""',
                f"    if {arg} is None:",
                f'        raise ValueError("{arg} must not be None")',
                f"    return sum(x * {n} for x in {arg}[:limit])",
            ]
        if kind == 1:
            return [
                f"for (let i = 0; i < {arg}.length; i++) {{",
                f"  {name} += {arg}[i] * {n};",
                "}",
            ]
        if kind == 2:
            return [f"SELECT {name}, COUNT(*) FROM {arg} WHERE {name} > {n} GROUP BY {name};"]
        if kind == 3:
            return [
                f"$ pip install {name}-{arg}=={n // 10}.{n % 10}.0 && python -m {name} --{arg} {n}"
            ]
        return [
            f"class {name.title().replace('_', '')}:",
            f"    def __init__(self, {arg}: int = {n}) -> None:",
            f"        self.{arg} = {arg}",
        ]

    def json_line(self) -> list[str]:
        record = {
            "id": self.rng.randrange(1, 100_000),
            "name": self.pick("names"),
            "city": self.pick("countries_cities_lines").split("|")[1],
            "score": round(self.rng.uniform(0, 100), 2),
            "tags": [self.pick("topics") for _ in range(self.rng.randrange(1, 4))],
            "active": self.rng.random() < 0.5,
            "note": None,
        }
        return [json.dumps(record, ensure_ascii=False)]

    def non_ascii(self) -> list[str]:
        kind = self.rng.choices(["accented_lines", "cjk_lines", "emoji_lines"], weights=[6, 2, 2])[
            0
        ]
        return [self.pick(kind)]


def corpus_lines(seed: int = 0, num_lines: int = 60_000) -> Iterator[str]:
    """``num_lines`` training lines (no newlines inside a line), the same for the same seed."""
    writer = _Writer(random.Random(seed))
    kinds: list[tuple[Callable[[], list[str]], int]] = [
        (lambda: [writer.sentence()], 30),
        (writer.chat, 20),
        (writer.question_answer, 15),
        (writer.numbers, 10),
        (writer.code, 10),
        (writer.json_line, 6),
        (writer.non_ascii, 9),
    ]
    makers = [maker for maker, _ in kinds]
    weights = [weight for _, weight in kinds]
    produced = 0
    while produced < num_lines:
        for line in writer.rng.choices(makers, weights=weights)[0]():
            if produced == num_lines:
                return
            produced += 1
            yield line
