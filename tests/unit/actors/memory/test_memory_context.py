"""Context assembly: the exact token budget, the documented priority order, the shapes."""

from __future__ import annotations

import pytest

from actors.memory.recall.context import PRIORITY, ContextAssembler, alternate, assemble_context
from actors.memory.records import MemoryRecall, RecalledFact
from cluster.config.memory import ContextConfig
from cluster.errors import InvalidRequestError
from engine.fake_engine import ByteTokenizer

SHARES = ContextConfig(long_term_share=0.5, episodic_share=0.5)
QUESTION = [{"role": "user", "content": "Which city do I live in?"}]


def recall() -> MemoryRecall:
    turns = [
        [{"role": "user", "content": f"Question number {i} about the garden?"},
         {"role": "assistant", "content": f"Answer number {i}: water the roses."}]
        for i in range(6)
    ]
    return MemoryRecall(
        facts=[RecalledFact(f"mem-{i}", text, "identity", 0.9 - i / 10, 0.8 - i / 10)
               for i, text in enumerate(["The user lives in Lisbon.", "The user likes roses.",
                                         "The user has a dog named Rex."])],
        session_summary=["User: I planted roses.", "Assistant: Roses need sun."],
        user_summary=["User: I moved last year."],
        turns=turns,
    )


def assemble(context_length: int, config: ContextConfig = SHARES, tokenizer=None, **kw):
    return ContextAssembler(tokenizer or ByteTokenizer(), config).assemble(
        kw.pop("messages", QUESTION), context_length=context_length, max_tokens=100,
        recall=kw.pop("recall", recall()), system_prompt=kw.pop("system_prompt", "Be brief."), **kw)


def text_of(out) -> str:
    return "\n".join(m["content"] for m in out.messages)


def test_everything_fits_a_large_window_in_display_order():
    out = assemble(10_000)
    assert out.facts == ["mem-0", "mem-1", "mem-2"]
    assert (out.session_summary, out.user_summary, out.turns, out.dropped_turns) == (2, 1, 6, 0)
    system = out.messages[0]["content"]
    assert system.startswith("Be brief.\n\nFacts about the user")
    assert system.index("Lisbon") < system.index("I moved last year") < system.index("I planted roses")
    roles = [m["role"] for m in out.messages]
    assert roles == ["system"] + ["user", "assistant"] * 6 + ["user"]
    assert out.messages[1]["content"].startswith("Question number 0")  # turns oldest first
    assert out.messages[-1] == QUESTION[0]
    assert out.token_ids == ByteTokenizer().apply_chat_template(out.messages)


def test_the_budget_is_met_exactly_at_the_boundary():
    full = assemble(10_000)
    n = full.prompt_tokens
    exact = assemble(n + 100)  # budget == the full prompt: everything still fits
    assert exact.prompt_tokens == n and exact.turns == 6
    one_less = assemble(n + 99)  # one token short: only the lowest-priority item goes
    assert one_less.prompt_tokens <= n - 1
    assert one_less.turns == 5 and one_less.dropped_turns == 1
    assert one_less.facts == full.facts and (one_less.session_summary, one_less.user_summary) == (2, 1)
    assert not text_of(one_less).count("Question number 0")  # the oldest turn


def test_every_budget_is_respected_and_filled():
    tokenizer = ByteTokenizer()
    base = assemble(10_000, recall=MemoryRecall()).prompt_tokens
    largest_item = 100  # a turn (~90 tokens), or a fact with its section heading (~80)
    for budget in range(base, base + 900, 7):
        out = assemble(budget + 100)
        assert out.prompt_tokens <= budget
        assert out.token_ids == tokenizer.apply_chat_template(out.messages)
        if out.turns < 6:
            # something was left out: what remains is less than one item
            assert budget - out.prompt_tokens < largest_item


def test_priority_order_recent_turn_then_facts_then_summaries_then_older_turns():
    full = assemble(10_000)
    assert full.order[0] == "recent_turns"
    ranks = [PRIORITY.index(kind) for kind in full.order]
    assert ranks == sorted(ranks)  # admitted in the documented order
    base = assemble(10_000, recall=MemoryRecall()).prompt_tokens
    newest_turn = assemble(base + 100 + 90, recall=MemoryRecall(turns=recall().turns[-1:])).prompt_tokens - base
    first_fact = len(f"\n\n{SHARES.facts_header}") + len("\n- The user lives in Lisbon.")
    tight = assemble(base + newest_turn + first_fact + 100)
    assert tight.order == ["recent_turns", "facts"] and tight.facts == ["mem-0"]
    assert tight.prompt_tokens == base + newest_turn + first_fact  # to the token
    # One token short for the best fact: a smaller, lower-ranked one takes the room.
    shorter = assemble(base + newest_turn + first_fact - 1 + 100)
    assert shorter.facts == ["mem-1"] and shorter.prompt_tokens < base + newest_turn + first_fact
    smallest_fact = len(f"\n\n{SHARES.facts_header}") + len("\n- The user likes roses.")
    tighter = assemble(base + newest_turn + smallest_fact - 1 + 100)
    assert tighter.facts == [] and tighter.turns == 1  # the room goes to a summary sentence
    assert tighter.order[0] == "recent_turns" and "facts" not in tighter.order


def test_shares_cap_memories_and_the_rest_goes_to_turns():
    out = assemble(1_500, ContextConfig(long_term_share=0.03, episodic_share=0.0))
    assert out.facts == ["mem-0"]  # 3% of 1,400 tokens holds one fact and its heading
    assert out.session_summary == out.user_summary == 0
    assert out.turns == 6


def test_older_turns_stay_contiguous():
    big = recall()
    big.turns[3][0]["content"] = "x" * 2_000  # an old turn too big for the window
    out = assemble(1_200, recall=big)
    kept = [m["content"] for m in out.messages if m["role"] == "user"][:-1]
    assert kept == [f"Question number {i} about the garden?" for i in (4, 5)]
    assert out.dropped_turns == 4


def test_request_that_cannot_fit_is_refused_naming_the_numbers():
    with pytest.raises(InvalidRequestError) as info:
        assemble(150, messages=[{"role": "user", "content": "y" * 200}])
    assert info.value.param == "messages" and "max_tokens=100" in info.value.message


def test_system_message_of_the_request_wins_and_no_memory_means_no_system():
    out = assemble(10_000, messages=[{"role": "system", "content": "Speak French."}, *QUESTION])
    assert out.messages[0]["content"].startswith("Speak French.\n\n")
    bare = assemble_context(ByteTokenizer(), QUESTION, context_length=500, max_tokens=100)
    assert bare.messages == QUESTION and bare.facts == []


def test_memory_sections_without_a_system_prompt_still_fit():
    for budget in (260, 300, 400, 800):
        out = assemble(budget + 100, system_prompt=None)
        assert out.prompt_tokens <= budget


def test_alternation_is_repaired_for_llama2():
    messages = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "a"},
                {"role": "user", "content": "b"}, {"role": "system", "content": "s"},
                {"role": "assistant", "content": "c"}]
    assert alternate(messages) == [{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c"}]


def test_real_tokenizer_never_exceeds_the_budget(tiny_checkpoint):
    from engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_checkpoint)
    assembler = ContextAssembler(tokenizer, SHARES)
    for context_length in range(200, 900, 37):
        out = assembler.assemble(QUESTION, context_length=context_length, max_tokens=100,
                                 recall=recall(), system_prompt="Be brief.")
        assert out.token_ids == tokenizer.apply_chat_template(out.messages)
        assert out.prompt_tokens <= context_length - 100
        if out.turns < 6:
            assert context_length - 100 - out.prompt_tokens < 40  # filled up to one item's size
