"""A generated long conversation per user for benchmarks/memory_recall.py.

Each user gets ~60 planted facts (identity, favourites, relatives, belongings, an allergy,
opinions, decisions, commitments) with values drawn from disjoint pools, so a value names one
fact only. Over ``turns`` turns (split into sessions) each fact is stated once, about half
are restated later in other words (paraphrases), about a quarter change later (a move, a new
job, a rescheduled commitment, a changed opinion), and every other turn is a distractor:
questions to the assistant, statements about other people, hypotheticals. Each fact has a
question and check strings for its latest and its outdated values.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

NAMES = ["Amara", "Bastian", "Corinna", "Dmitri", "Elodie", "Farrukh", "Greta", "Hideo", "Ines", "Jovan"]
CITIES = ["Lisbon", "Tallinn", "Ljubljana", "Valparaiso", "Hobart", "Tromso", "Cusco", "Windhoek",
          "Kraków", "Galway", "Bergen", "Quebec City", "Porto Alegre", "Nagano"]
JOBS = ["pediatric nurse", "marine biologist", "tax accountant", "sound engineer", "landscape architect",
        "paramedic", "locksmith", "translator", "bookbinder", "geologist", "pastry chef", "tram driver"]
COMPANIES = ["Nortwell Labs", "Brightlane Logistics", "Kestrel Foods", "Olmstead Bank", "Veridian Media",
             "Quillfeather Press", "Halcyon Robotics", "Tamsin Energy", "Corvid Security", "Ashgrove Clinic"]
FAVOURITES = {
    "drink": ["matcha latte", "hibiscus tea", "oat flat white", "ginger kombucha", "rooibos"],
    "food": ["mushroom risotto", "pad see ew", "shakshuka", "pierogi", "bibimbap"],
    "colour": ["teal", "burnt orange", "lavender", "mustard yellow", "forest green"],
    "book": ["The Left Hand of Darkness", "Middlemarch", "Pachinko", "Dune Messiah", "Stoner"],
    "movie": ["Paddington 2", "Spirited Away", "Arrival", "The Third Man", "Amelie"],
    "band": ["Khruangbin", "Radiohead", "Fleetwood Mac", "Bonobo", "Sigur Ros"],
    "sport": ["bouldering", "water polo", "badminton", "curling", "fencing"],
    "dessert": ["tiramisu", "pavlova", "baklava", "creme brulee", "mochi"],
    "fruit": ["persimmon", "lychee", "quince", "dragon fruit", "gooseberry"],
    "board game": ["Carcassonne", "Wingspan", "Azul", "Catan", "Terraforming Mars"],
    "painter": ["Hilma af Klint", "Paul Klee", "Frida Kahlo", "Edward Hopper", "Vermeer"],
    "flower": ["peony", "ranunculus", "foxglove", "camellia", "anemone"],
    "cheese": ["gruyere", "manchego", "taleggio", "halloumi", "stilton"],
    "tv show": ["Slow Horses", "The Bear", "Detectorists", "Severance", "Bluey"],
    "poet": ["Wislawa Szymborska", "Mary Oliver", "Pablo Neruda", "Seamus Heaney", "Rumi"],
    "podcast": ["Radiolab", "99% Invisible", "Hardcore History", "Song Exploder", "Darknet Diaries"],
    "season": ["late autumn", "early spring", "midsummer", "deep winter", "monsoon season"],
}
RELATIVES = ["sister", "brother", "mother", "father", "partner", "best friend", "daughter", "boss"]
PET_NAMES = ["Biscuit", "Pixel", "Marzipan", "Noodle", "Juniper", "Pretzel", "Waffles", "Mochi-cat"]
PEOPLE = ["Henrike", "Oskar", "Lucia", "Tobiah", "Marisol", "Anselm", "Yara", "Casimir", "Philippa",
          "Radomir", "Sunniva", "Evander", "Ottilie", "Benedek", "Xanthe", "Leocadia"]
BELONGINGS = {
    "car": ["Skoda Octavia", "Volvo V60", "Kia Niro", "Fiat Panda", "Subaru Outback", "Renault Zoe"],
    "phone": ["Pixel 8", "iPhone 13 mini", "Fairphone 5", "Galaxy S23", "Nokia G42"],
    "blood type": ["O negative", "AB positive", "B negative", "A positive"],
    "shoe size": ["EU 38", "EU 44", "EU 41", "EU 46"],
    "dentist": ["Dr. Marrow", "Dr. Okonkwo", "Dr. Lindqvist", "Dr. Ferreira"],
    "birthday": ["the 3rd of March", "the 17th of August", "the 29th of November", "the 8th of June"],
}
BELONGING_QUESTIONS = {"car": "What car do I drive?", "phone": "Which phone do I have?",
                       "dentist": "Who is my dentist?", "birthday": "When is my birthday?"}
ALLERGIES = ["hazelnuts", "penicillin", "shellfish", "birch pollen", "sesame"]
OPINIONS = ["salsa dancing", "jazz fusion", "camping in the rain", "spicy food", "horror films",
            "early morning runs"]
DECISIONS = [("sell my old motorbike", "my old motorbike", "motorbike"),
             ("learn to play the cello", "music lessons", "cello"),
             ("switch to a vegetarian diet", "my diet", "vegetarian diet"),
             ("take a sabbatical next spring", "taking time off work", "sabbatical"),
             ("renovate the kitchen", "the house", "renovate the kitchen"),
             ("adopt a rescue greyhound", "getting a pet", "rescue greyhound"),
             ("stop drinking soda", "soda", "stop drinking soda"),
             ("move my savings into an index fund", "my savings", "index fund")]
COMMITMENTS = [("send the quarterly report to Maria", "the quarterly report"),
               ("call the plumber about the leaking tap", "the plumber"),
               ("book the train tickets to Vienna", "the train tickets"),
               ("pay the electricity bill", "the electricity bill"),
               ("review Jonas's pull request", "Jonas's pull request"),
               ("renew my passport", "my passport")]
DAYS = ["on Monday", "on Tuesday", "on Wednesday", "on Thursday", "on Friday", "on Saturday", "by the 15th"]
DISTRACTOR_PLACES = ["Reykjavik", "Marrakesh", "Osaka", "Montevideo", "Hanoi", "Zanzibar", "Oaxaca"]
DISTRACTOR_TOPICS = ["photosynthesis", "black holes", "the French revolution", "sourdough starters",
                     "compound interest", "plate tectonics", "the immune system", "solar panels",
                     "chess openings", "the history of tea", "octopus intelligence", "bread baking",
                     "how vaccines work", "the Roman empire", "machine learning", "coral reefs"]
QUESTIONS = ["Can you explain {t} in simple terms?", "What are three surprising facts about {t}?",
             "How would you teach {t} to a ten year old?", "Give me a short summary of {t}.",
             "What is a common misconception about {t}?", "Is there a good book about {t}?"]
THIRD_PARTY = ["My colleague {p} lives in {c}.", "My neighbour {p} just got back from {c}.",
               "My friend's favourite drink is espresso tonic.", "If I lived in {c}, I would cycle more.",
               "My friend's favourite dessert is lemon tart.", "I'll pay the water bill on Friday.",
               "I decided to repaint the garden fence.", "My colleague's favourite band is Daft Punk.",
               "My cousin {p} works as a firefighter.", "What's the weather usually like in {c} in May?",
               "My friend {p} loves karaoke.", "Someone at the gym told me {c} is lovely in spring."]
ACKS = ["Thanks for telling me, I'll keep that in mind.", "Got it, that's good to know.",
        "Noted! Thanks for sharing.", "That's lovely to hear, thanks for letting me know."]
ANSWER = ["{T} is a fascinating subject with a long history.",
          "In short, {t} comes down to a few simple ideas that build on each other.",
          "Many people find {t} confusing at first, but the basics are approachable.",
          "A good way to start with {t} is to look at everyday examples.",
          "Researchers are still learning new things about {t} every year."]


@dataclass
class PlantedFact:
    key: str
    question: str
    first: list[str]  # phrasings of the first statement ({v} = value)
    paraphrases: list[str]
    changes: list[str]  # phrasings of a changed value ({v} = new value)
    values: list[str]  # the value and the ones it may change to
    check: str = "{v}"  # what the context must contain, from a value
    stale_check: str | None = None  # regex for an outdated value, from a value
    # filled by the generator
    value_history: list[str] = field(default_factory=list)

    def present(self, value: str, text: str) -> bool:
        return self.check.format(v=value).lower() in text.lower()

    def stale(self, value: str, text: str) -> bool:
        if self.stale_check is not None:
            return re.search(self.stale_check.format(v=re.escape(value)), text, re.IGNORECASE) is not None
        return self.present(value, text)


@dataclass(frozen=True)
class Event:
    fact: int
    kind: str  # first | paraphrase | change
    text: str


@dataclass
class Conversation:
    user: str
    facts: list[PlantedFact]
    turns: list[tuple[str, str, Event | None]]  # (user text, assistant text, planted event)
    session_of_turn: list[str]


def _catalog(rng: random.Random) -> list[PlantedFact]:
    def pick(pool: list[str], n: int) -> list[str]:
        return rng.sample(pool, n)

    facts = [
        PlantedFact("name", "What is my name?", ["My name is {v}."], ["Call me {v}.", "People call me {v}."],
                    [], pick(NAMES, 1)),
        PlantedFact("location", "Which city do I live in?", ["I live in {v}."],
                    ["I'm based in {v}.", "{v} is where I live.", "These days I call {v} home."],
                    ["I moved to {v} last month."], pick(CITIES[:7], 2)),
        PlantedFact("hometown", "Where am I originally from?", ["I'm originally from {v}."], ["I am from {v}."],
                    [], pick(CITIES[7:], 1)),
        PlantedFact("job", "What do I do for a living?", ["I work as a {v}."],
                    ["By profession I'm a {v}.", "I'm working as a {v}."], ["I started working as a {v}."],
                    pick(JOBS, 2)),
        PlantedFact("employer", "Which company do I work for?", ["I work at {v}."], ["My employer is {v}."],
                    ["I joined {v} this week."], pick(COMPANIES, 2)),
    ]
    age = rng.randint(24, 60)
    facts.append(PlantedFact("age", "How old am I?", ["I'm {v} years old."], [], ["I just turned {v}."],
                             [str(age), str(age + 1)], check="{v} years old"))
    changing_favourites = set(rng.sample(sorted(FAVOURITES), 5))
    for kind, pool in FAVOURITES.items():
        n = 2 if kind in changing_favourites else 1
        facts.append(PlantedFact(
            f"favourite {kind}", f"What is my favourite {kind}?", ["My favourite {k} is {v}.".replace("{k}", kind)],
            ["{v} is my favourite {k}.".replace("{k}", kind), "My favorite {k} is {v}.".replace("{k}", kind),
             "I prefer {v} to any other {k}.".replace("{k}", kind)],
            ["My favourite {k} is now {v}.".replace("{k}", kind)] if n == 2 else [], pick(pool, n)))
    people = rng.sample(PEOPLE, len(RELATIVES) + 1)
    for i, relative in enumerate(RELATIVES):
        values = [people[i], people[-1]] if relative == "boss" else [people[i]]
        facts.append(PlantedFact(
            f"{relative}'s name", f"What is my {relative}'s name?", [f"My {relative}'s name is {{v}}."],
            [f"My {relative} is called {{v}}.", f"{{v}} is my {relative}."],
            ["My new boss is called {v}."] if relative == "boss" else [],
            values))
    pets = rng.sample(PET_NAMES, 2)
    for animal, name in zip(("dog", "cat"), pets):
        facts.append(PlantedFact(f"{animal}'s name", f"What is my {animal}'s name?", [f"I have a {animal} named {{v}}."],
                                 [f"My {animal}'s name is {{v}}."], [], [name]))
    changing_belongings = {"car", "phone"}
    for kind, pool in BELONGINGS.items():
        n = 2 if kind in changing_belongings else 1
        verb = "is on" if kind == "birthday" else "is"
        facts.append(PlantedFact(
            kind, BELONGING_QUESTIONS.get(kind, f"What is my {kind}?"),
            [f"My {kind} {verb} {{v}}."], [], [f"My {kind} is now {{v}}."] if n == 2 else [], pick(pool, n)))
    facts.append(PlantedFact("allergy", "What am I allergic to?", ["I'm allergic to {v}."],
                             ["I have an allergy to {v}."], [], pick(ALLERGIES, 1)))
    for topic in rng.sample(OPINIONS, 4):
        changes = ["I don't like {v} anymore."] if len(facts) % 2 else []
        fact = PlantedFact(f"opinion {topic}", f"Do I enjoy {topic}?", ["I love {v}."], ["I really enjoy {v}."],
                           [], [topic], check="likes {v}", stale_check=r"(?<!dis)likes {v}")
        if changes:  # the value stays the topic; the check flips to the new opinion
            fact.changes = changes
            fact.values = [topic, topic]
        facts.append(fact)
    for action, topic, key in rng.sample(DECISIONS, 6):
        facts.append(PlantedFact(f"decision {key}", f"What did I decide about {topic}?", ["I decided to {v}."],
                                 ["I have decided to {v}.", "I've chosen to {v}."], [], [action], check=key))
    for action, topic in COMMITMENTS:
        days = rng.sample(DAYS, 2)
        changing = rng.random() < 0.5
        facts.append(PlantedFact(
            f"commitment {topic}", f"When will I {action.split(' ')[0]} {topic}?",
            [f"I'll {action} {{v}}."], [f"I promise to {action} {{v}}."],
            [f"I'll {action} {{v}} instead."] if changing else [],
            days if changing else days[:1], check=f"{action.split(' my ')[-1]} {{v}}"))
    return facts


def _distractor(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.75:
        topic = rng.choice(DISTRACTOR_TOPICS)
        answer = " ".join(rng.sample(ANSWER, 2)).replace("{T}", topic[0].upper() + topic[1:]).replace("{t}", topic)
        return rng.choice(QUESTIONS).format(t=topic), answer
    text = rng.choice(THIRD_PARTY).format(p=rng.choice(PEOPLE), c=rng.choice(DISTRACTOR_PLACES))
    return text, rng.choice(["Interesting!", "That sounds nice.", "Good to know."])


def generate(user: str, turns: int = 1000, session_turns: int = 100, seed: int = 0) -> Conversation:
    """The conversation of ``user`` (deterministic for a seed)."""
    rng = random.Random(f"{seed}-{user}")
    facts = _catalog(rng)
    slots: dict[int, Event] = {}
    free = list(range(turns))
    rng.shuffle(free)

    def place(low: int, high: int, event: Event) -> int:
        for i, turn in enumerate(free):
            if low <= turn < high and turn not in slots:
                slots[turn] = event
                free.pop(i)
                return turn
        raise RuntimeError("no free turn; raise turns")

    span = int(turns * 0.7)
    for index, fact in enumerate(facts):
        first = place(0, span, Event(index, "first", rng.choice(fact.first).format(v=fact.values[0])))
        fact.value_history = [fact.values[0]]
        last = first
        if fact.paraphrases and rng.random() < 0.6:
            last = place(first + 3, int(turns * 0.85), Event(index, "paraphrase",
                                                             rng.choice(fact.paraphrases).format(v=fact.values[0])))
        if fact.changes and len(fact.values) > 1:
            place(max(last, first) + 3, turns - 5, Event(index, "change", rng.choice(fact.changes).format(v=fact.values[1])))
            fact.value_history.append(fact.values[1])
    # A change of opinion keeps the topic as value: the check flips from likes to dislikes.
    for fact in facts:
        if fact.key.startswith("opinion") and len(fact.value_history) == 2:
            fact.check, fact.stale_check = "dislikes {v}", r"(?<!dis)likes {v}"
    conversation = []
    for turn in range(turns):
        event = slots.get(turn)
        if event is None:
            conversation.append((*_distractor(rng), None))
        else:
            lead = rng.choice(["", "", "Oh, by the way, ", "Just so you know, ", "Also, "])
            text = lead + (event.text[0].lower() + event.text[1:] if lead and not event.text.startswith("I") else event.text)
            conversation.append((text, rng.choice(ACKS), event))
    sessions = [f"sess-{user}-{turn // session_turns:03d}" for turn in range(turns)]
    return Conversation(user, facts, conversation, sessions)


__all__ = ["generate", "Conversation", "PlantedFact", "Event"]
