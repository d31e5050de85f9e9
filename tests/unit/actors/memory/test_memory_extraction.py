"""Fact extraction (rules and model-backed) and summaries (extractive and model-backed)."""

from __future__ import annotations

import asyncio

import pytest

from actors.memory.learning.extraction import (
    ModelFactExtractor,
    RuleFactExtractor,
    as_memory_query,
    parse_json_list,
    split_sentences,
)
from actors.memory.learning.summarizer import ExtractiveSummarizer, ModelSummarizer, SummarySentence
from engine.embedding.embedders import HashingEmbedder


def facts(text: str, role: str = "user"):
    return RuleFactExtractor().extract([{"role": role, "content": text}])


@pytest.mark.parametrize(
    "text, slot, value, fact",
    [
        ("My name is Alice Walker.", "name", "Alice Walker", "The user's name is Alice Walker."),
        ("Oh, I live in Paris, which is lovely.", "location", "Paris", "The user lives in Paris."),
        ("Actually I moved to Berlin last month.", "location", "Berlin", "The user lives in Berlin."),
        ("Paris is where I live now.", "location", "Paris", "The user lives in Paris."),
        ("I work as a nurse.", "job", "a nurse", "The user works as a nurse."),
        ("I now work for Siemens", "employer", "Siemens", "The user works at Siemens."),
        ("I'm 34 years old.", "age", "34", "The user is 34 years old."),
        ("Green tea is my favourite drink.", "favourite:drink", "Green tea",
         "The user's favourite drink is Green tea."),
        ("My favorite drink is now coffee!", "favourite:drink", "coffee", "The user's favourite drink is coffee."),
        ("I'm allergic to peanuts.", "allergy:peanuts", "peanuts", "The user is allergic to peanuts."),
        ("I don't like jazz anymore.", "opinion:jazz", "dislikes jazz", "The user dislikes jazz."),
        ("I love hiking.", "opinion:hiking", "likes hiking", "The user likes hiking."),
        ("I have a dog named Rex.", "attr:dog's name", "Rex", "The user has a dog named Rex."),
        ("My dog's name is Rex.", "attr:dog's name", "Rex", "The user's dog's name is Rex."),
        ("My sister is called Jane.", "attr:sister's name", "Jane", "The user's sister's name is Jane."),
        ("My dentist is Dr. Marrow.", "attr:dentist", "Dr. Marrow", "The user's dentist is Dr. Marrow."),
        ("I'll send the report to Maria on Friday.", "commitment:send the report to maria", "on Friday",
         "The user will send the report to Maria on Friday."),
        ("I decided to sell my car.", None, "to sell my car", "The user decided to sell their car."),
    ],
)
def test_rules_find_who_the_user_is_preferences_decisions_commitments(text, slot, value, fact):
    found = facts(text)
    assert len(found) == 1
    assert (found[0].slot, found[0].value, found[0].text) == (slot, value, fact)


@pytest.mark.parametrize(
    "text",
    [
        "What is my favourite drink?",  # a question states nothing
        "Is my favourite drink tea",
        "My colleague Anna lives in Rome.",  # about someone else
        "If I lived in Rome, I would cycle more.",
        "My question is simple.",  # a figure of speech, not an attribute
        "Can you explain black holes?",
    ],
)
def test_rules_ignore_questions_and_other_people(text):
    assert facts(text) == []


def test_rules_read_only_the_users_messages_and_each_clause():
    assert facts("I live in Paris.", role="assistant") == []
    found = facts("I love hiking and I work as a nurse. My name is Bo.")
    assert [f.slot for f in found] == ["opinion:hiking", "job", "name"]
    assert [(f.message_index, f.sentence_index) for f in found] == [(0, 0), (0, 0), (0, 1)]


def test_a_rescheduled_commitment_keeps_its_slot():
    before = facts("I'll call the plumber on Monday.")[0]
    after = facts("I'll call the plumber on Thursday instead.")[0]
    assert before.slot == after.slot == "commitment:call the plumber"
    assert (before.value, after.value) == ("on Monday", "on Thursday")


def test_sentences_split_but_not_after_titles():
    assert split_sentences("Dr. Who is here. I like tea!\nNext") == ["Dr. Who is here.", "I like tea!", "Next"]


def test_questions_are_rewritten_in_the_facts_person():
    assert as_memory_query("Which company do I work for?") == "Which company does the user work for?"
    assert as_memory_query("How old am I?") == "How old is the user?"
    assert as_memory_query("What is my favourite drink?") == "What is the user's favourite drink?"


def test_model_extractor_parses_json_from_prose_sync_and_async():
    reply = 'Sure! [{"fact": "The user lives in Oslo.", "kind": "identity", "slot": "location", ' \
            '"value": "Oslo", "importance": 0.9}, {"no": "fact"}, {"fact": "x", "kind": "bogus"}] done'
    prompts: list[str] = []

    def sync_generate(prompt: str) -> str:
        prompts.append(prompt)
        return reply

    async def async_generate(prompt: str) -> str:
        return reply

    for generate in (sync_generate, async_generate):
        found = asyncio.run(ModelFactExtractor(generate).extract([{"role": "user", "content": "I live in Oslo"}]))
        assert [(f.text, f.slot, f.value, f.importance) for f in found][0] == (
            "The user lives in Oslo.", "location", "Oslo", 0.9)
        assert found[1].kind == "attribute"  # unknown kind falls back
    assert "user: I live in Oslo" in prompts[0]
    assert asyncio.run(ModelFactExtractor(lambda p: "no json here").extract([])) == []
    assert parse_json_list("[1, 2") == []


def test_extractive_summary_keeps_central_sentences_within_budget_in_order():
    embedder = HashingEmbedder()
    sentences = [
        SummarySentence("User: We planned the trip to the lake with the kids.", 0),
        SummarySentence("Assistant: The lake trip with the kids needs a tent.", 1),
        SummarySentence("User: Zebras are striped.", 2),
        SummarySentence("User: The kids want to swim in the lake on the trip.", 3, ("mem-1",)),
        SummarySentence("User: ok", 4),
    ]
    count = len  # one token per character: exact budgets
    summarizer = ExtractiveSummarizer(embedder, count)
    budget = len(sentences[3].text) + len(sentences[0].text) + 2
    chosen = summarizer.summarize(sentences, budget)
    assert sum(count(s.text) + 1 for s in chosen) <= budget
    assert [s.turn_id for s in chosen] == sorted(s.turn_id for s in chosen)  # original order
    assert sentences[3] in chosen  # central and stated a fact
    assert sentences[2] not in chosen  # the outlier
    assert summarizer.summarize(sentences, 5) == []
    assert summarizer.summarize([], 100) == []
    # Precomputed embeddings give the same choice.
    vectors = embedder.embed([s.text for s in sentences])
    assert summarizer.summarize(sentences, budget, vectors) == chosen


def test_model_summarizer_uses_the_template_and_fits_the_budget():
    seen = []

    async def generate(prompt: str) -> str:
        seen.append(prompt)
        return "The user plans a lake trip. They have two kids. They like swimming."

    summarizer = ModelSummarizer(generate, len)
    out = asyncio.run(summarizer.summarize([SummarySentence("User: lake trip", 7), SummarySentence("x y z", 9)], 60))
    assert [s.text for s in out] == ["The user plans a lake trip.", "They have two kids."]
    assert all(s.turn_id == 7 for s in out)
    assert "User: lake trip" in seen[0]
