"""Content safety: checks find spans, a tenant's policy decides (allow, redact, block).

Checks are plugins (``SafetyCheck``: ``name`` and ``scan(text) -> [Finding]``); three are
built in:

- ``pii``: e-mail addresses, phone numbers (international ``+``, parenthesised area
  codes, grouped digits; not dates, IP addresses or bare digit runs), payment card
  numbers (13-19 digits passing the Luhn check), keys and tokens (OpenAI, AWS, GitHub,
  Slack, Google API keys, private key headers, JWTs, bearer tokens, ``password=...``);
- ``blocklist``: configured terms, whole words, case-insensitive;
- ``injection``: prompt-injection markers echoed back in the output ("ignore previous
  instructions", other models' chat-template tokens, "reveal your system prompt" ...).

Categories are dotted (``pii.email``); a policy maps a category or any dotted prefix of it
to an action (``pii`` covers ``pii.email`` unless ``pii.email`` is given itself). ``block``
ends the output with ``finish_reason="content_filter"`` before the segment that holds the
hit; ``redact`` replaces the span with ``[LABEL]``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from engine.output.types import Finding, SafetyAction, SafetyCheck

# -- PII ------------------------------------------------------------------------------------

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}(?![\w-])"
)
_CARD = re.compile(r"(?<![\w.-])\d(?:[ -]?\d){12,18}(?![\w-]|\.\d)")
_PHONE = re.compile(
    r"(?<![\w+@.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{1,4}){1,5}(?![\w@-]|\.\d)"
)
_DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}")
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_LOCAL_PHONE = re.compile(r"\d{3}[ .-]\d{4}")
_ANY_DIGIT = re.compile(r"\d")
_SECRETS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (label, re.compile(pattern))
    for label, pattern in (
        ("openai_key", r"(?<![\w-])sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"),
        ("aws_key", r"(?<![A-Z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Z0-9])"),
        ("github_token", r"(?<!\w)(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})"),
        ("slack_token", r"(?<!\w)xox[abprs]-[A-Za-z0-9-]{10,}"),
        ("google_key", r"(?<!\w)AIza[0-9A-Za-z_-]{35}"),
        ("private_key", r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----"),
        ("jwt", r"(?<![\w-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
        ("bearer", r"(?i:\bbearer)[ \t]+(?P<v>[A-Za-z0-9._~+/-]{20,}=*)"),
        (
            "assignment",
            r"(?i:\b(?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|password|passwd)\b)"
            r"[ \t]*[:=][ \t]*[\"']?(?P<v>[^\s\"']{8,})",
        ),
    )
)


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a string of digits (payment card numbers pass it)."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return bool(digits) and total % 10 == 0


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


def _is_phone(match: str) -> bool:
    if _DATE.fullmatch(match) or _IPV4.fullmatch(match):
        return False
    count = len(_digits(match))
    if match.startswith("+"):
        return 8 <= count <= 15
    separated = "(" in match or any(c in match for c in " .-")
    if not separated:
        return False  # a bare run of digits: an id or an amount as often as a phone
    return 10 <= count <= 15 or bool(_LOCAL_PHONE.fullmatch(match))


class PiiCheck:
    """E-mail addresses, phone numbers, card numbers (Luhn), keys and tokens."""

    name = "pii"
    KINDS = ("email", "phone", "card", "secret")

    def __init__(self, kinds: Iterable[str] = KINDS) -> None:
        self.kinds = frozenset(kinds)
        unknown = self.kinds - set(self.KINDS)
        if unknown:
            raise ValueError(
                f"unknown PII kinds {sorted(unknown)}; use some of {', '.join(self.KINDS)}"
            )

    def scan(self, text: str) -> list[Finding]:
        found: list[Finding] = []
        has_digit = _ANY_DIGIT.search(text) is not None
        if "email" in self.kinds and "@" in text:
            found += [
                Finding(self.name, "pii.email", m.start(), m.end()) for m in _EMAIL.finditer(text)
            ]
        cards: list[tuple[int, int]] = []
        if "card" in self.kinds and has_digit:
            for m in _CARD.finditer(text):
                digits = _digits(m.group())
                if 13 <= len(digits) <= 19 and luhn_valid(digits):
                    cards.append(m.span())
                    found.append(Finding(self.name, "pii.card", m.start(), m.end()))
        if "phone" in self.kinds and has_digit:
            for m in _PHONE.finditer(text):
                if _is_phone(m.group()) and not any(
                    s < m.end() and m.start() < e for s, e in cards
                ):
                    found.append(Finding(self.name, "pii.phone", m.start(), m.end()))
        if "secret" in self.kinds:
            for _, pattern in _SECRETS:
                for m in pattern.finditer(text):
                    start, end = m.span("v") if "v" in pattern.groupindex else m.span()
                    found.append(Finding(self.name, "pii.secret", start, end))
        return found


class BlocklistCheck:
    """Configured terms as whole words, case-insensitive; runs of spaces in a term match
    any run of spaces or tabs."""

    name = "blocklist"

    def __init__(self, terms: Iterable[str], category: str = "blocklist") -> None:
        self.terms = tuple(dict.fromkeys(t.strip() for t in terms if t.strip()))
        self.category = category
        parts = sorted(
            (r"[ \t]+".join(map(re.escape, t.split())) for t in self.terms), key=len, reverse=True
        )
        self._regex = (
            re.compile(r"(?<!\w)(?:" + "|".join(parts) + r")(?!\w)", re.IGNORECASE)
            if parts
            else None
        )

    def scan(self, text: str) -> list[Finding]:
        if self._regex is None:
            return []
        return [
            Finding(self.name, self.category, m.start(), m.end())
            for m in self._regex.finditer(text)
        ]


DEFAULT_INJECTION_MARKERS: tuple[str, ...] = (
    r"\b(?:ignore|disregard|forget|override)\s+(?:all\s+|any\s+)?(?:of\s+)?(?:the\s+|your\s+|my\s+)?"
    r"(?:previous|prior|above|earlier|preceding|system)\s+(?:instructions?|prompts?|messages?|rules|directions)",
    r"\byou\s+are\s+now\s+(?:in\s+)?(?:DAN|developer\s+mode|jailbroken|unrestricted|unfiltered)\b",
    r"\b(?:reveal|print|show|repeat|output)\s+(?:me\s+)?(?:your|the)\s+(?:system\s+prompt|hidden\s+instructions)",
    r"<\|(?:im_start|im_end|system|user|assistant|endoftext|begin_of_text|start_header_id|end_header_id|eot_id)\|>",
    r"(?<!\w)#{2,3}[ \t]*(?:system|instruction)s?[ \t]*:",
    r"\bBEGIN\s+(?:SYSTEM|ADMIN|DEVELOPER)\s+(?:PROMPT|INSTRUCTIONS?|MESSAGE)\b",
)


class InjectionCheck:
    """Prompt-injection markers in the output (case-insensitive regular expressions)."""

    name = "injection"

    def __init__(self, markers: Sequence[str] | None = None) -> None:
        self.markers = tuple(DEFAULT_INJECTION_MARKERS if markers is None else markers)
        self._regex = (
            re.compile("|".join(f"(?:{m})" for m in self.markers), re.IGNORECASE)
            if self.markers
            else None
        )

    def scan(self, text: str) -> list[Finding]:
        if self._regex is None:
            return []
        return [
            Finding(self.name, "injection", m.start(), m.end())
            for m in self._regex.finditer(text)
            if m.end() > m.start()
        ]


# -- policy and its application -------------------------------------------------------------


@dataclass(frozen=True)
class SafetyPolicy:
    """A tenant's actions per category; categories not covered get ``default_action``."""

    actions: Mapping[str, SafetyAction]
    default_action: SafetyAction = "allow"
    redaction: str = "[{label}]"

    def action_for(self, category: str) -> SafetyAction:
        key = category
        while True:
            action = self.actions.get(key)
            if action is not None:
                return action
            if "." not in key:
                return self.default_action
            key = key.rsplit(".", 1)[0]

    def replacement(self, category: str) -> str:
        return self.redaction.format(label=category.rsplit(".", 1)[-1].upper(), category=category)


@dataclass(frozen=True)
class SafetyVerdict:
    text: str  # the segment after redaction ("" when blocked)
    findings: tuple[Finding, ...]
    blocked: bool


class SafetyGuard:
    """Runs a tenant's checks over a segment and applies its policy."""

    def __init__(self, checks: Sequence[SafetyCheck], policy: SafetyPolicy) -> None:
        self.checks = tuple(checks)
        self.policy = policy

    @property
    def active(self) -> bool:
        """Whether anything can happen to the text: a policy that allows every category needs
        no check on the stream (and then tokens are not held back to sentence boundaries)."""
        policy = self.policy
        acting = policy.default_action != "allow" or any(a != "allow" for a in policy.actions.values())
        return bool(self.checks) and acting

    def apply(self, segment: str, offset: int = 0) -> SafetyVerdict:
        hits: list[Finding] = []
        size = len(segment)
        for check in self.checks:
            # a plugin's empty or out-of-range span would corrupt the redaction: ignored
            hits.extend(f for f in check.scan(segment) if 0 <= f.start < f.end <= size)
        if not hits:
            return SafetyVerdict(segment, (), False)
        hits.sort(key=lambda f: (f.start, -f.end))
        judged = tuple(
            replace(
                f,
                action=self.policy.action_for(f.category),
                start=f.start + offset,
                end=f.end + offset,
            )
            for f in hits
        )
        if any(f.action == "block" for f in judged):
            return SafetyVerdict("", judged, True)
        return SafetyVerdict(self._redact(segment, judged, offset), judged, False)

    def _redact(self, segment: str, findings: Sequence[Finding], offset: int) -> str:
        pieces: list[str] = []
        cursor = 0
        for f in findings:
            if f.action != "redact":
                continue
            start, end = f.start - offset, f.end - offset
            if end <= cursor:
                continue  # inside a span already replaced
            if start < cursor:  # overlaps the previous span: extend it
                cursor = end
                continue
            pieces.append(segment[cursor:start])
            pieces.append(self.policy.replacement(f.category))
            cursor = end
        pieces.append(segment[cursor:])
        return "".join(pieces)
