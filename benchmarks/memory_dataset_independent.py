"""The independently phrased split of benchmarks/memory_recall.py.

``benchmarks/memory_dataset.py`` writes its statements ("My favourite drink is {v}.") and
questions ("What is my favourite drink?") together with the extraction rules they exercise,
so its recall says little about real conversations. Here facts come up the way people mention
them in passing: inside narration, never in a rule's pattern ("my name is", "I live in",
"my favourite ... is", "I work as", "I'm allergic to", ...), each with several phrasings
(one drawn per user), and the questions are worded apart from the statements (other words,
no shared template). Distractor turns are the same kind as in the rule-phrased split.
A fact is found when its value is in the assembled memory context (the question excluded).
"""

from __future__ import annotations

import random

from benchmarks.memory_dataset import (
    ACKS,
    ALLERGIES,
    CITIES,
    COMPANIES,
    JOBS,
    PEOPLE,
    PET_NAMES,
    Conversation,
    Event,
    PlantedFact,
    _distractor,
)

INSTRUMENTS = ["cello", "bassoon", "ukulele", "harp", "accordion", "banjo"]
DISHES = ["mushroom risotto", "pad see ew", "shakshuka", "pierogi", "bibimbap", "moussaka"]
TEAMS = ["Galway United", "Hobart Hurricanes", "Bergen Brann", "Cusco Condors", "Nagano Parceiro"]
HOBBIES = ["bouldering", "fencing", "beekeeping", "letterpress printing", "sea kayaking", "origami"]
CARS = ["Skoda Octavia", "Volvo V60", "Kia Niro", "Fiat Panda", "Subaru Outback", "Renault Zoe"]
LANGUAGES = ["Portuguese", "Estonian", "Slovene", "Icelandic", "Tagalog", "Welsh"]
SCHOOLS = ["Trinity College Dublin", "University of Tartu", "Charles University", "McGill", "Keio University"]


def _catalog(rng: random.Random) -> list[PlantedFact]:
    people = rng.sample(PEOPLE, 3)

    def fact(key: str, question: str, phrasings: list[str], pool: list[str]) -> PlantedFact:
        return PlantedFact(key, question, phrasings, [], [], [rng.choice(pool)])

    return [
        fact("home", "Remind me which city we ended up settling in?", [
            "We finally finished unpacking the boxes in our new flat in {v}.",
            "The trams in {v} were late again this morning, classic.",
            "Since we moved to {v} I walk along the river every evening.",
        ], CITIES),
        fact("occupation", "Any idea what kind of work pays my bills?", [
            "Another twelve-hour shift today; being a {v} is exhausting but rewarding.",
            "The other {v}s on my team threw me a small party for my five years in the job.",
            "Training as a {v} took years, and I still learn something every week.",
        ], JOBS),
        fact("company", "Which organisation employs me again?", [
            "The canteen at {v} finally started serving decent coffee.",
            "My manager at {v} approved the new project today.",
            "Our whole department at {v} is relocating to the third floor.",
        ], COMPANIES),
        fact("instrument", "What do I practise in the evenings for music?", [
            "My neighbours must be tired of hearing me practise the {v} every night.",
            "I restrung my {v} yesterday and it sounds wonderful.",
            "The {v} teacher said my scales are getting cleaner.",
        ], INSTRUMENTS),
        fact("dish", "What should you suggest if I ask what to cook for a treat?", [
            "Whenever I need comfort I end up making {v} again.",
            "Nothing beats the {v} I cook on Sunday nights.",
            "I could eat {v} three times a week and never tire of it.",
        ], DISHES),
        fact("team", "Which club am I always cheering for?", [
            "Did you see {v} lose on Saturday? I shouted at the screen for an hour.",
            "I bought season tickets for {v} again.",
            "Wearing my {v} scarf to every match since I was a kid.",
        ], TEAMS),
        fact("hobby", "What do I spend my weekends doing?", [
            "Spent the whole Saturday {v} with the club, my arms are sore.",
            "I signed up for an advanced {v} course this autumn.",
            "Honestly {v} is what keeps me sane on weekends.",
        ], HOBBIES),
        fact("car", "What am I driving these days?", [
            "The {v} needed new tyres before the road trip.",
            "I parked the {v} outside the bakery and got a ticket.",
            "Our old {v} still starts every winter morning without fail.",
        ], CARS),
        fact("language", "Which language have I been learning?", [
            "My {v} tutor says my pronunciation finally sounds natural.",
            "I watched a whole film in {v} without subtitles last night.",
            "Duolingo reminded me I have a 200-day streak in {v}.",
        ], LANGUAGES),
        fact("school", "Where did I get my degree?", [
            "Had a reunion with my classmates from {v} over the weekend.",
            "Those four years at {v} shaped how I think.",
            "An alumni letter from {v} asked me to mentor a student.",
        ], SCHOOLS),
        fact("pet", "What's the name of the animal that lives with us?", [
            "{v} knocked a glass off the table again this morning, what a rascal.",
            "Took {v} to the vet for her shots, she hated every minute.",
            "{v} slept on my keyboard during the whole meeting.",
        ], PET_NAMES),
        fact("allergy", "Is there anything I must avoid eating or taking?", [
            "Ended up in the emergency room because the sauce had {v} in it.",
            "I always carry my epinephrine pen in case I come across {v}.",
            "The nurse double-checked my chart for {v} before the procedure.",
        ], ALLERGIES),
        fact("sibling", "Who is the sibling I keep mentioning?", [
            "My sister {v} is visiting next month with the kids.",
            "{v}, my younger sister, just started her own company.",
            "Had a long call with my sister {v} about our parents.",
        ], people),
    ]


def generate_independent(user: str, turns: int = 400, session_turns: int = 100, seed: int = 0) -> Conversation:
    """The independently phrased conversation of ``user`` (deterministic for a seed); each
    fact is mentioned twice, in two different phrasings, far apart."""
    rng = random.Random(f"independent-{seed}-{user}")
    facts = _catalog(rng)
    slots: dict[int, Event] = {}
    free = list(range(turns))
    rng.shuffle(free)
    for index, planted in enumerate(facts):
        planted.value_history = [planted.values[0]]
        for text in rng.sample(planted.first, 2):
            slots[free.pop()] = Event(index, "first", text.format(v=planted.values[0]))
    conversation = []
    for turn in range(turns):
        event = slots.get(turn)
        if event is None:
            conversation.append((*_distractor(rng), None))
        else:
            conversation.append((event.text, rng.choice(ACKS), event))
    sessions = [f"sess-{user}-ind-{turn // session_turns:03d}" for turn in range(turns)]
    return Conversation(user, facts, conversation, sessions)


__all__ = ["generate_independent"]
