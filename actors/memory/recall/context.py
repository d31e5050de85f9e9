"""Context assembly: the prompt of one request, from memory, within the model's window.

The prompt is ``[system: prompt + memory sections] + recent turns + the request's messages``
rendered with the model's chat template; it never holds more than
``context_length - max_tokens`` tokens, counted by rendering it with the model's tokenizer.

Priority order (highest first; a lower item only gets what the higher ones left):

0. the system prompt and the request's own messages (never dropped: if they alone do not fit,
   the request is refused with HTTP 400 naming the numbers);
1. the newest ``context.min_recent_turns`` turns of the session;
2. long-term facts, best ranked first, within ``long_term_share`` of the budget;
3. the session summary, newest sentences first, then the user summary, together within
   ``episodic_share`` of the budget;
4. older turns, newest first, as long as they fit (turns stay contiguous: the first one that
   does not fit ends the window);
5. messages of earlier conversations found by hybrid retrieval (``recall.units``, best first,
   actors/memory_retrieval.pack_units): they fill what is left, within ``units_share`` of the
   budget, grouped by session under a date header, each at most once. Should the exact render
   overshoot, this block shrinks before anything is dropped. When there are such messages,
   the user summary (a digest of the same conversations) comes after them instead of before
   the older turns.

Items are costed with the tokenizer and added in that order; the prompt is then rendered
exactly and, should template joins make it longer than estimated, the lowest-priority item
is taken out until it fits (then leftover room is offered once more). Display order differs
from priority order: facts in rank order, summaries and turns chronologically.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from actors.memory.recall.retrieval import PackedUnits, pack_units
from actors.memory.records import MemoryRecall
from cluster.config.memory import ContextConfig
from cluster.errors import InvalidRequestError

# Token counts of parts miss the rendered prompt's by a few tokens where parts join (measured:
# at most one on LoCoMo contexts); shrinking units, and deciding whether a leftover item is
# worth a trial render, allow this much.
FIT_SLACK = 4
PRIORITY = ("request", "recent_turns", "facts", "session_summary", "user_summary", "older_turns", "units")


@dataclass
class AssembledContext:
    messages: list[dict[str, str]]
    token_ids: list[int]
    budget: int
    facts: list[str] = field(default_factory=list)  # ids of the facts included
    session_summary: int = 0  # sentences included
    user_summary: int = 0
    turns: int = 0  # recent turns included
    dropped_turns: int = 0  # recent turns left out
    order: list[str] = field(default_factory=list)  # item kinds in the order they were admitted
    units: list[int] = field(default_factory=list)  # keys of the earlier messages included
    units_text: str = ""  # the block of earlier messages as placed in the system message
    query_ms: float = 0.0  # memory's share: embedding the query and searching (set by the shard)

    @property
    def prompt_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(eq=False)
class _Item:
    kind: str  # recent_turns | facts | session_summary | user_summary | older_turns
    index: int
    cost: int
    section: str | None = None  # the system section it belongs to (for the header cost)
    charged: int = 0  # cost when admitted (header included)
    packed: PackedUnits | None = None  # the units block (kind ``units``)


def _group(item: _Item) -> str | None:
    """The budget share an item counts against."""
    if item.kind == "facts":
        return "facts"
    if item.kind in ("session_summary", "user_summary"):
        return "episodic"
    if item.kind == "units":
        return "units"
    return None


def _spent(admitted: list[_Item], group: str) -> int:
    return sum(i.charged for i in admitted if _group(i) == group)


def alternate(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Messages made acceptable to Llama 2's template: system first (at most one), then
    user/assistant alternating from a user turn; same-role neighbours are joined."""
    out: list[dict[str, str]] = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            continue
        if not out and role == "assistant":
            continue
        if out and out[-1]["role"] == role:
            out[-1] = {"role": role, "content": f"{out[-1]['content']}\n\n{content}"}
        else:
            out.append({"role": role, "content": content})
    return out


class ContextAssembler:
    """Fits memory into prompts for one tokenizer (caches the token cost of texts)."""

    def __init__(self, tokenizer: Any, config: ContextConfig | None = None, cache_size: int = 8192) -> None:
        self.tokenizer = tokenizer
        self.config = config or ContextConfig()
        self._costs: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._cache_size = cache_size

    def _cost(self, kind: str, text: str) -> int:
        key = (kind, text)
        cost = self._costs.get(key)
        if cost is not None:
            self._costs.move_to_end(key)
            return cost
        cost = self.tokenizer.count_tokens(text)
        self._costs[key] = cost
        if len(self._costs) > self._cache_size:
            self._costs.popitem(last=False)
        return cost

    def _turn_cost(self, turn: list[dict[str, str]]) -> int:
        messages = alternate(turn)
        if not messages:
            return 0
        key = ("turn", "\x00".join(f"{m['role']}\x01{m['content']}" for m in messages))
        cost = self._costs.get(key)
        if cost is None:
            cost = len(self.tokenizer.apply_chat_template(messages, add_generation_prompt=False))
            self._costs[key] = cost
        return cost

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def assemble(
        self,
        messages: Sequence[Any],
        *,
        context_length: int,
        max_tokens: int,
        recall: MemoryRecall | None = None,
        system_prompt: str | None = None,
    ) -> AssembledContext:
        """The prompt for ``messages`` (the request's; a system message among them replaces
        ``system_prompt``) with as much of ``recall`` as fits (see the module docstring)."""
        recall = recall or MemoryRecall()
        request = [_as_dict(m) for m in messages]
        for m in request:
            if m["role"] == "system":
                system_prompt = m["content"]
        request = [m for m in request if m["role"] != "system"]
        budget = context_length - max_tokens
        base = self._messages(system_prompt, [], [], [], [], request, "")
        base_ids = self.render(base)
        if len(base_ids) > budget:
            raise InvalidRequestError(
                f"messages are {len(base_ids)} tokens, and max_tokens={max_tokens} leaves "
                f"{budget} of the context length {context_length}; shorten the messages or "
                f"lower max_tokens to <= {context_length - len(base_ids)}",
                param="messages",
            )
        turns = recall.turns
        items = self._candidates(recall)
        caps = {
            "facts": int(self.config.long_term_share * budget),
            "episodic": int(self.config.episodic_share * budget),
            "units": int(self.config.units_share * budget),
        }
        used = len(base_ids)
        admitted: list[_Item] = []
        turns_blocked = False
        for item in items:
            is_turn = item.kind in ("recent_turns", "older_turns")
            if is_turn and turns_blocked:
                continue
            if item.kind == "units":
                self._pack(item, recall, system_prompt, admitted, min(caps["units"], budget - used))
                if item.packed is None:
                    continue
            cost = self._admission_cost(item, system_prompt, admitted)
            group = _group(item)
            over_cap = group is not None and _spent(admitted, group) + cost > caps[group]
            if used + cost > budget or over_cap:
                turns_blocked = turns_blocked or is_turn
                continue
            used += cost
            item.charged = cost
            admitted.append(item)
        messages_out, ids = self._fit(system_prompt, recall, admitted, request, budget)
        # Room left by an over-estimate is offered once more to the next item in priority.
        for item in items:
            if item in admitted or item.kind == "units" or budget - len(ids) < item.cost:
                continue
            group = _group(item)
            if group is not None and _spent(admitted, group) + item.cost > caps[group]:
                continue
            if item.kind in ("recent_turns", "older_turns") and not self._contiguous(admitted, item):
                continue
            item.charged = self._admission_cost(item, system_prompt, admitted)
            if budget - len(ids) < item.charged - FIT_SLACK:
                break  # its header too cannot fit: rendering the trial would be wasted
            trial = admitted + [item]
            trial_messages = self._build(system_prompt, recall, trial, request)
            trial_ids = self.render(trial_messages)
            if len(trial_ids) <= budget:
                admitted, messages_out, ids = trial, trial_messages, trial_ids
            break
        kept_turns = sum(1 for i in admitted if i.kind in ("recent_turns", "older_turns"))
        return AssembledContext(
            messages=messages_out,
            token_ids=ids,
            budget=budget,
            facts=[recall.facts[i.index].id for i in admitted if i.kind == "facts"],
            session_summary=sum(1 for i in admitted if i.kind == "session_summary"),
            user_summary=sum(1 for i in admitted if i.kind == "user_summary"),
            turns=kept_turns,
            dropped_turns=len(turns) - kept_turns,
            order=[i.kind for i in admitted],
            units=next((list(i.packed.keys) for i in admitted if i.packed is not None), []),
            units_text=next((i.packed.text for i in admitted if i.packed is not None), ""),
        )

    def _pack(self, item: _Item, recall: MemoryRecall, system_prompt: str | None,
              admitted: list[_Item], room: int) -> None:
        """Fill the units item with the best units that fit ``room`` tokens (its join to the
        other system sections, and the system wrapper if it opens the system message, included)."""
        open_sections = any(i.section or i.packed is not None for i in admitted)
        overhead = self._cost("line", "\n\n") + (0 if system_prompt or open_sections else self._system_wrapper_cost())
        packed = pack_units(recall.units, room - overhead, self.tokenizer.count_tokens, self.config.units_header)
        item.packed = packed if packed.keys else None
        item.cost = packed.cost + overhead if packed.keys else 0

    # -- candidates -------------------------------------------------------------------------

    def _candidates(self, recall: MemoryRecall) -> list[_Item]:
        turns = recall.turns
        newest = list(range(len(turns) - 1, -1, -1))
        first = newest[: self.config.min_recent_turns]
        items = [_Item("recent_turns", i, self._turn_cost(turns[i])) for i in first]
        items += [
            _Item("facts", i, self._cost("line", f"\n- {fact.text}"), "facts")
            for i, fact in enumerate(recall.facts)
        ]
        items += [
            _Item("session_summary", i, self._cost("line", f" {text}"), "session_summary")
            for i in range(len(recall.session_summary) - 1, -1, -1)
            for text in [recall.session_summary[i]]
        ]
        user_summary = [
            _Item("user_summary", i, self._cost("line", f" {text}"), "user_summary")
            for i, text in enumerate(recall.user_summary)
        ]
        older = [_Item("older_turns", i, self._turn_cost(turns[i])) for i in newest[len(first):]]
        if not recall.units:
            return items + user_summary + older
        # the earlier messages themselves come before the user summary, a digest of them
        return items + older + [_Item("units", 0, 0)] + user_summary

    def _admission_cost(self, item: _Item, system_prompt: str | None, admitted: list[_Item]) -> int:
        """The item's tokens plus its section header (and the system wrapper) if it opens them."""
        if item.section is None:
            return item.cost
        open_sections = {i.section for i in admitted if i.section}
        if item.section in open_sections:
            return item.cost
        cost = item.cost + self._cost("line", f"\n\n{self._header(item.section)}")
        system_open = open_sections or any(i.packed is not None for i in admitted)  # units open it too
        if not system_prompt and not system_open:
            cost += self._system_wrapper_cost()
        return cost

    def _system_wrapper_cost(self) -> int:
        """Tokens the template adds around a system message (``<<SYS>>`` ... ``<</SYS>>``)."""
        key = ("wrapper", "")
        if key not in self._costs:
            probe = [{"role": "user", "content": "x"}]
            with_system = [{"role": "system", "content": "y"}, *probe]
            self._costs[key] = max(
                0,
                len(self.tokenizer.apply_chat_template(with_system))
                - len(self.tokenizer.apply_chat_template(probe))
                - self.tokenizer.count_tokens("y"),
            )
        return self._costs[key]

    def _header(self, section: str) -> str:
        return {
            "facts": self.config.facts_header,
            "session_summary": self.config.summary_header,
            "user_summary": self.config.user_summary_header,
        }[section]

    @staticmethod
    def _contiguous(admitted: list[_Item], item: _Item) -> bool:
        kept = {i.index for i in admitted if i.kind in ("recent_turns", "older_turns")}
        return not kept or item.index == min(kept) - 1

    # -- rendering --------------------------------------------------------------------------

    def _fit(
        self,
        system_prompt: str | None,
        recall: MemoryRecall,
        admitted: list[_Item],
        request: list[dict[str, str]],
        budget: int,
    ) -> tuple[list[dict[str, str]], list[int]]:
        while True:
            messages = self._build(system_prompt, recall, admitted, request)
            ids = self.render(messages)
            if len(ids) <= budget or not admitted:
                return messages, ids
            units = next((i for i in admitted if i.packed is not None), None)
            if units is not None and admitted[-1] is units and units.packed is not None:
                # the units block is the lowest item left: shrink it rather than drop it
                room = units.packed.cost - (len(ids) - budget) - FIT_SLACK
                packed = pack_units(recall.units, room, self.tokenizer.count_tokens, self.config.units_header)
                if packed.keys and room > 0:
                    units.packed = packed
                    continue
            admitted.pop()  # the lowest-priority item admitted

    def _build(
        self,
        system_prompt: str | None,
        recall: MemoryRecall,
        admitted: list[_Item],
        request: list[dict[str, str]],
    ) -> list[dict[str, str]]:
        chosen: dict[str, list[int]] = {}
        for item in admitted:
            chosen.setdefault(item.kind, []).append(item.index)
        facts = [recall.facts[i].text for i in sorted(chosen.get("facts", []))]
        session = [recall.session_summary[i] for i in sorted(chosen.get("session_summary", []))]
        user = [recall.user_summary[i] for i in sorted(chosen.get("user_summary", []))]
        turn_ids = sorted(chosen.get("recent_turns", []) + chosen.get("older_turns", []))
        turns = [recall.turns[i] for i in turn_ids]
        units = next((i.packed.text for i in admitted if i.packed is not None), "")
        return self._messages(system_prompt, facts, user, session, turns, request, units)

    def _messages(
        self,
        system_prompt: str | None,
        facts: list[str],
        user_summary: list[str],
        session_summary: list[str],
        turns: list[list[dict[str, str]]],
        request: list[dict[str, str]],
        units: str = "",
    ) -> list[dict[str, str]]:
        parts = [system_prompt] if system_prompt else []
        if facts:
            parts.append(self.config.facts_header + "".join(f"\n- {f}" for f in facts))
        if user_summary:
            parts.append(self.config.user_summary_header + "\n" + " ".join(user_summary))
        if units:
            parts.append(units)
        if session_summary:
            parts.append(self.config.summary_header + "\n" + " ".join(session_summary))
        system = "\n\n".join(parts)
        conversation = alternate([m for turn in turns for m in turn] + request)
        if conversation and conversation[0]["role"] != "user":
            conversation = conversation[1:]
        head = [{"role": "system", "content": system}] if system else []
        return head + conversation


def _as_dict(message: Any) -> dict[str, str]:
    if isinstance(message, dict):
        return {"role": message["role"], "content": message["content"]}
    as_dict = getattr(message, "as_dict", None)
    if callable(as_dict):
        return dict(as_dict())
    return {"role": message.role, "content": message.content}


def assemble_context(
    tokenizer: Any,
    messages: Sequence[Any],
    *,
    context_length: int,
    max_tokens: int,
    recall: MemoryRecall | None = None,
    system_prompt: str | None = None,
    config: ContextConfig | None = None,
) -> AssembledContext:
    """One-off ``ContextAssembler(tokenizer, config).assemble(...)`` (no cost cache kept)."""
    return ContextAssembler(tokenizer, config).assemble(
        messages, context_length=context_length, max_tokens=max_tokens, recall=recall,
        system_prompt=system_prompt,
    )


__all__ = ["ContextAssembler", "AssembledContext", "assemble_context", "alternate", "PRIORITY"]
