"""Dates in conversation memory: relative expressions resolved against the turn's date.

A turn said on 8 May 2023 that reads "I went to a support group yesterday" means 7 May 2023;
read a year later, "yesterday" means nothing. At absorb time ``resolve_mentions`` finds the
relative expressions of a turn (yesterday, last week, next month, two weekends ago, last
Friday, ...) and resolves them against the turn's time into a ``TimeMention``: a readable
label ("7 May 2023", "the week before 9 June 2023", "June 2023") that the context shows next
to the phrase, and the covered span ``[start, end)`` in epoch seconds (UTC) that questions
about time filter and boost on.

For questions, ``question_time`` tells whether a question asks about time ("when", "how
long ago", "what year") and which span it names ("in May 2023", "in 2022"), with
``before`` / ``after`` when the question says so.

Pure functions of their inputs (the anchor date is always passed in): tests use fixed dates.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

DAY = 86_400.0
MONTHS = {name.lower(): i for i, name in enumerate(calendar.month_name) if name}
MONTHS.update({name.lower(): i for i, name in enumerate(calendar.month_abbr) if name})
MONTHS.pop("may", None)
MONTHS["may"] = 5
WEEKDAYS = {name.lower(): i for i, name in enumerate(calendar.day_name)}
NUMBERS = {
    "a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "a couple of": 2, "a couple": 2,
    "couple of": 2, "a few": 3, "few": 3, "several": 3,
}
_NUMBER = r"(\d{1,2}|a couple of|a couple|couple of|a few|few|several|an|a|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve)"
_WEEKDAY = r"(monday|tuesday|wednesday|thursday|friday|saturday|sunday)"
_MONTH = r"(january|february|march|april|may|june|july|august|september|october|november|december|jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec)"


@dataclass(frozen=True)
class TimeMention:
    """A relative expression of a turn, resolved: the phrase as written, a readable label and
    the span it covers (epoch seconds, UTC, end exclusive)."""

    phrase: str
    label: str
    start: float
    end: float

    def to_json(self) -> list:
        return [self.phrase, self.label, self.start, self.end]

    @classmethod
    def from_json(cls, data: list) -> TimeMention:
        return cls(str(data[0]), str(data[1]), float(data[2]), float(data[3]))


def day_label(day: date) -> str:
    return f"{day.day} {calendar.month_name[day.month]} {day.year}"


def month_label(year: int, month: int) -> str:
    return f"{calendar.month_name[month]} {year}"


def _ts(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


def _span(first: date, days: int) -> tuple[float, float]:
    start = _ts(first)
    return start, start + days * DAY


def _month_span(year: int, month: int) -> tuple[float, float]:
    last = calendar.monthrange(year, month)[1]
    return _span(date(year, month, 1), last)


def _add_months(year: int, month: int, delta: int) -> tuple[int, int]:
    index = year * 12 + (month - 1) + delta
    return index // 12, index % 12 + 1


def _count(word: str) -> int:
    word = word.lower()
    return int(word) if word.isdigit() else NUMBERS.get(word, 1)


def as_day(at: float) -> date:
    return datetime.fromtimestamp(at, tz=UTC).date()


# -- session dates -----------------------------------------------------------------------------

_SESSION_DATE = re.compile(
    r"(?:(\d{1,2}):(\d{2})\s*(am|pm)\s*on\s*)?(\d{1,2})\s+([A-Za-z]+),?\s+(\d{4})", re.IGNORECASE
)


def parse_date_time(text: str) -> float | None:
    """Epoch seconds (UTC) of a written date such as "1:56 pm on 8 May, 2023" or "8 May 2023";
    an ISO date is accepted too. None when the text is no date."""
    text = text.strip()
    found = _SESSION_DATE.search(text)
    if found:
        hour, minute, half, day, month_name, year = found.groups()
        month = MONTHS.get(month_name.lower())
        if month is None:
            return None
        h = int(hour) % 12 + (12 if half and half.lower() == "pm" else 0) if hour else 0
        return datetime(int(year), month, int(day), h, int(minute or 0), tzinfo=UTC).timestamp()
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


# -- relative expressions in turns -------------------------------------------------------------

_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\bthe day before yesterday\b"), "day_before_yesterday"),
    (re.compile(r"\bthe day after tomorrow\b"), "day_after_tomorrow"),
    (re.compile(r"\b(yesterday|last night)\b"), "yesterday"),
    (re.compile(r"\b(today|tonight|this morning|this afternoon|this evening)\b"), "today"),
    (re.compile(r"\btomorrow\b"), "tomorrow"),
    (re.compile(rf"\b{_NUMBER} (days?|weeks?|weekends?|months?|years?) ago\b"), "ago"),
    (re.compile(rf"\b(?:in|within) {_NUMBER} (days?|weeks?|months?|years?)\b"), "ahead"),
    (re.compile(r"\b(last|past|next|this|this past|this coming) (week|weekend|month|year)\b"), "unit"),
    (re.compile(rf"\b(last|next|this|this past|this coming|on) {_WEEKDAY}\b"), "weekday"),
    (re.compile(rf"\b(last|next|this|this past) {_MONTH}\b"), "month"),
]


def _resolve(kind: str, groups: tuple[str, ...], day: date) -> tuple[str, float, float] | None:
    anchor = day_label(day)
    if kind in ("yesterday", "today", "tomorrow", "day_before_yesterday", "day_after_tomorrow"):
        shift = {"yesterday": -1, "today": 0, "tomorrow": 1, "day_before_yesterday": -2,
                 "day_after_tomorrow": 2}[kind]
        target = day + timedelta(days=shift)
        return (day_label(target), *_span(target, 1))
    if kind in ("ago", "ahead"):
        n, unit = _count(groups[0]), groups[1].rstrip("s")
        sign = -1 if kind == "ago" else 1
        if unit == "day":
            target = day + timedelta(days=sign * n)
            return (day_label(target), *_span(target, 1))
        if unit in ("week", "weekend"):
            target = day + timedelta(days=sign * 7 * n)
            word = "before" if sign < 0 else "after"
            plural = f"{groups[0]} {unit}s" if n != 1 else f"the {unit}"
            return (f"{plural} {word} {anchor}", *_span(target - timedelta(days=3), 7))
        if unit == "month":
            year, month = _add_months(day.year, day.month, sign * n)
            return (month_label(year, month), *_month_span(year, month))
        year = day.year + sign * n
        return (str(year), *_span(date(year, 1, 1), 366 if calendar.isleap(year) else 365))
    if kind == "unit":
        which, unit = groups[0], groups[1]
        past = which in ("last", "past", "this past")
        future = which in ("next", "this coming")
        if unit == "week":
            monday = day - timedelta(days=day.weekday())
            if past:
                return (f"the week before {anchor}", *_span(monday - timedelta(days=7), 7))
            if future:
                return (f"the week after {anchor}", *_span(monday + timedelta(days=7), 7))
            return (f"the week of {anchor}", *_span(monday, 7))
        if unit == "weekend":
            saturday = day + timedelta(days=(5 - day.weekday()) % 7)
            if past or (which == "this" and day.weekday() in (0, 1, 2)):
                saturday = saturday - timedelta(days=7)
                return (f"the weekend before {anchor}", *_span(saturday, 2))
            return (f"the weekend after {anchor}" if future else f"the weekend of {anchor}", *_span(saturday, 2))
        if unit == "month":
            shift = -1 if past else 1 if future else 0
            year, month = _add_months(day.year, day.month, shift)
            return (month_label(year, month), *_month_span(year, month))
        year = day.year - 1 if past else day.year + 1 if future else day.year
        return (str(year), *_span(date(year, 1, 1), 366 if calendar.isleap(year) else 365))
    if kind == "weekday":
        which, name = groups[0], groups[1]
        weekday = WEEKDAYS[name]
        capital = name.capitalize()
        if which in ("next", "this coming") or (which == "this" and weekday > day.weekday()):
            ahead = (weekday - day.weekday()) % 7 or 7
            target = day + timedelta(days=ahead)
            return (f"the {capital} after {anchor}", *_span(target, 1))
        back = (day.weekday() - weekday) % 7 or 7  # last / on / this past: the nearest past one
        target = day - timedelta(days=back)
        return (f"the {capital} before {anchor}", *_span(target, 1))
    if kind == "month":
        which, name = groups[0], groups[1]
        month = MONTHS[name]
        if which in ("last", "this past"):
            year = day.year - 1 if month >= day.month else day.year
        elif which == "next":
            year = day.year + 1 if month <= day.month else day.year
        else:
            year = day.year
        return (month_label(year, month), *_month_span(year, month))
    return None


def resolve_mentions(text: str, at: float) -> list[TimeMention]:
    """The relative time expressions of ``text`` resolved against ``at`` (the turn's time),
    in the order they appear, overlapping matches dropped."""
    lowered = text.lower()
    day = as_day(at)
    found: list[tuple[int, int, TimeMention]] = []
    for pattern, kind in _RULES:
        for match in pattern.finditer(lowered):
            if any(s < match.end() and match.start() < e for s, e, _ in found):
                continue
            resolved = _resolve(kind, match.groups(), day)
            if resolved is None:
                continue
            label, start, end = resolved
            phrase = text[match.start():match.end()]
            found.append((match.start(), match.end(), TimeMention(phrase, label, start, end)))
    found.sort(key=lambda item: item[0])
    return [mention for _, _, mention in found]


def annotate(text: str, mentions: list[TimeMention]) -> str:
    """``text`` with each mention's label after its phrase: "yesterday [7 May 2023]"."""
    out, position = [], 0
    lowered = text.lower()
    for mention in mentions:
        at = lowered.find(mention.phrase.lower(), position)
        if at < 0:
            continue
        end = at + len(mention.phrase)
        out.append(text[position:end] + f" [{mention.label}]")
        position = end
    out.append(text[position:])
    return "".join(out)


# -- questions about time ----------------------------------------------------------------------

_ASKS_TIME = re.compile(
    r"\b(when|what (?:date|day|time|year|month|week)|which (?:year|month|day|date)|how long ago|"
    r"how long (?:has|have|had|did|was|were)|since when|what time)\b",
    re.IGNORECASE,
)
_Q_MONTH_YEAR = re.compile(rf"\b{_MONTH},? (\d{{4}})\b", re.IGNORECASE)
_Q_DAY_MONTH_YEAR = re.compile(rf"\b(\d{{1,2}}) {_MONTH},? (\d{{4}})\b", re.IGNORECASE)
_Q_YEAR = re.compile(r"\b(?:in|during|of|since|before|after) ((?:19|20)\d{2})\b", re.IGNORECASE)
_Q_DIRECTION = re.compile(r"\b(before|after|since|prior to|until)\b", re.IGNORECASE)


@dataclass(frozen=True)
class QuestionTime:
    """What a question says about time: whether it asks for one, and the span it names
    (``direction``: ``in``, ``before`` or ``after`` that span)."""

    asks_when: bool
    start: float | None = None
    end: float | None = None
    direction: str = "in"

    @property
    def has_span(self) -> bool:
        return self.start is not None and self.end is not None

    def matches(self, start: float, end: float) -> bool:
        """Whether a span ``[start, end)`` fits what the question names."""
        if not self.has_span:
            return False
        assert self.start is not None and self.end is not None
        if self.direction == "before":
            return start < self.start
        if self.direction == "after":
            return end > self.end
        return start < self.end and self.start < end


def question_time(question: str) -> QuestionTime:
    """See ``QuestionTime``."""
    asks = bool(_ASKS_TIME.search(question))
    direction_match = _Q_DIRECTION.search(question)
    direction = "in"
    if direction_match:
        word = direction_match.group(1).lower()
        direction = "before" if word in ("before", "prior to", "until") else "after"
    found = _Q_DAY_MONTH_YEAR.search(question)
    if found:
        day, month, year = int(found.group(1)), MONTHS[found.group(2).lower()], int(found.group(3))
        try:
            start, end = _span(date(year, month, day), 1)
        except ValueError:
            start = end = None
        if start is not None:
            return QuestionTime(asks, start, end, direction)
    found = _Q_MONTH_YEAR.search(question)
    if found:
        start, end = _month_span(int(found.group(2)), MONTHS[found.group(1).lower()])
        return QuestionTime(asks, start, end, direction)
    found = _Q_YEAR.search(question)
    if found:
        year = int(found.group(1))
        start, end = _span(date(year, 1, 1), 366 if calendar.isleap(year) else 365)
        return QuestionTime(asks, start, end, direction)
    return QuestionTime(asks)


__all__ = [
    "TimeMention",
    "QuestionTime",
    "resolve_mentions",
    "annotate",
    "question_time",
    "parse_date_time",
    "day_label",
    "month_label",
    "as_day",
]
