"""BABILong qa1-qa5 (Kuratov et al., 2024): bAbI-style facts scattered through long background text.

The facts come from a small simulator written here: people move between places, pick up, drop and hand each
other objects; the question is answered from the simulated state. Background text is the generated haystack
(``text.Haystack``), whose vocabulary shares no name, place, object or verb with the facts.

| task | facts | question |
| --- | --- | --- |
| qa1 | moves | Where is Mary? (the last move of one person) |
| qa2 | moves, pick up, drop | Where is the football? (who holds it or where it was dropped, and where they are) |
| qa3 | moves, pick up, drop | Where was the football before the kitchen? (the object's history of places) |
| qa4 | two spatial relations | What is north of the kitchen? / What is the kitchen north of? |
| qa5 | moves, pick up, drop, give | Who gave the apple to Bill? / Who did Fred give the apple to? / What did ... |
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from .ruler import sample_rng
from .text import Haystack, Sample, TextTokenizer, fit, insert_at_depths

PEOPLE = ["Mary", "John", "Daniel", "Sandra", "Fred", "Bill", "Jeff", "Julie"]
PLACES = ["kitchen", "garden", "bathroom", "office", "hallway", "bedroom"]
OBJECTS = ["football", "apple", "milk", "umbrella"]
DIRECTIONS = {"north": "south", "south": "north", "east": "west", "west": "east"}
MOVE = ["went to", "journeyed to", "travelled to", "moved to", "went back to"]
TAKE = ["picked up", "got", "grabbed", "took"]
DROP = ["dropped", "discarded", "put down", "left"]
GIVE = ["gave", "handed", "passed"]
# every word of the facts' own vocabulary; the background text must use none of them
FACT_WORDS = set(w.lower() for w in PEOPLE + PLACES + OBJECTS + list(DIRECTIONS)) | {
    w for phrase in MOVE + TAKE + DROP + GIVE for w in phrase.split() if w not in ("to", "up", "down", "back")}


@dataclass
class Story:
    facts: List[str]
    question: str
    prefix: str  # the answer prefix the query ends with
    answer: str
    supporting: List[int]  # indices of the facts the answer rests on


class World:
    """People, places and objects, with every fact that changed them and each object's history of places."""

    def __init__(self, rng: random.Random, people: int = 4) -> None:
        self.rng = rng
        self.people = rng.sample(PEOPLE, people)
        self.where: Dict[str, Optional[str]] = {p: None for p in self.people}
        self.holder: Dict[str, Optional[str]] = {o: None for o in OBJECTS}
        self.placed: Dict[str, Optional[str]] = {o: None for o in OBJECTS}  # where a dropped object lies
        self.history: Dict[str, List[Tuple[str, int]]] = {o: [] for o in OBJECTS}  # (place, fact index)
        self.facts: List[str] = []
        self.last_move: Dict[str, int] = {}
        self.last_owner_fact: Dict[str, int] = {}  # the fact that last handed an object to someone or dropped it
        self.drop_move: Dict[str, int] = {}  # for a dropped object: the dropper's move that put them there
        self.gives: List[Tuple[str, str, str, int]] = []  # (giver, object, receiver, fact index)

    def location(self, obj: str) -> Optional[str]:
        h = self.holder[obj]
        return self.where[h] if h else self.placed[obj]

    def _note(self, obj: str) -> None:
        place = self.location(obj)
        if place and (not self.history[obj] or self.history[obj][-1][0] != place):
            self.history[obj].append((place, len(self.facts) - 1))

    def move(self) -> None:
        p = self.rng.choice(self.people)
        place = self.rng.choice([x for x in PLACES if x != self.where[p]])
        self.where[p] = place
        self.facts.append(f"{p} {self.rng.choice(MOVE)} the {place}.")
        self.last_move[p] = len(self.facts) - 1
        for o, h in self.holder.items():
            if h == p:
                self._note(o)

    def take(self) -> bool:
        options = [(p, o) for p in self.people if self.where[p] for o in OBJECTS
                   if self.holder[o] is None and self.placed[o] in (None, self.where[p])]
        if not options:
            return False
        p, o = self.rng.choice(options)
        self.holder[o], self.placed[o] = p, None
        self.facts.append(f"{p} {self.rng.choice(TAKE)} the {o} there.")
        self.last_owner_fact[o] = len(self.facts) - 1
        self._note(o)
        return True

    def drop(self) -> bool:
        options = [(h, o) for o, h in self.holder.items() if h]
        if not options:
            return False
        p, o = self.rng.choice(options)
        self.holder[o], self.placed[o] = None, self.where[p]
        self.drop_move[o] = self.last_move[p]
        self.facts.append(f"{p} {self.rng.choice(DROP)} the {o}.")
        self.last_owner_fact[o] = len(self.facts) - 1
        return True

    def give(self) -> bool:
        options = [(h, o, q) for o, h in self.holder.items() if h for q in self.people
                   if q != h and self.where[q] == self.where[h]]
        if not options:
            return False
        p, o, q = self.rng.choice(options)
        self.holder[o] = q
        self.facts.append(f"{p} {self.rng.choice(GIVE)} the {o} to {q}.")
        self.last_owner_fact[o] = len(self.facts) - 1
        self.gives.append((p, o, q, len(self.facts) - 1))
        return True

    def run(self, events: int, weights: Dict[str, float]) -> None:
        acts: Dict[str, Callable[[], object]] = {"move": self.move, "take": self.take, "drop": self.drop,
                                                 "give": self.give}
        names = list(weights)
        while len(self.facts) < events:
            act = self.rng.choices(names, weights=[weights[n] for n in names])[0]
            if acts[act]() is False:
                self.move()


def _qa1(rng: random.Random) -> Optional[Story]:
    w = World(rng)
    w.run(rng.randint(4, 10), {"move": 1.0})
    p = rng.choice(sorted(w.last_move))
    return Story(w.facts, f"Where is {p}?", f"{p} is in the", w.where[p], [w.last_move[p]])


def _qa2(rng: random.Random) -> Optional[Story]:
    w = World(rng)
    w.run(rng.randint(8, 20), {"move": 0.6, "take": 0.25, "drop": 0.15})
    known = [o for o in OBJECTS if w.location(o) and o in w.last_owner_fact]
    if not known:
        return None
    o = rng.choice(known)
    h = w.holder[o]
    support = [w.last_owner_fact[o], w.last_move[h] if h else w.drop_move[o]]
    return Story(w.facts, f"Where is the {o}?", f"The {o} is in the", w.location(o), support)


def _qa3(rng: random.Random) -> Optional[Story]:
    w = World(rng, people=3)
    w.run(rng.randint(12, 30), {"move": 0.55, "take": 0.3, "drop": 0.15})
    options = []
    for o, hist in w.history.items():
        places = [pl for pl, _ in hist]
        for i in range(1, len(hist)):
            if places.count(places[i]) == 1:  # asked about a place the object was in only once
                options.append((o, i))
    if not options:
        return None
    o, i = rng.choice(options)
    hist = w.history[o]
    return Story(w.facts, f"Where was the {o} before the {hist[i][0]}?",
                 f"Before the {hist[i][0]}, the {o} was in the", hist[i - 1][0], [hist[i - 1][1], hist[i][1]])


def _qa4(rng: random.Random) -> Optional[Story]:
    a, b, c = rng.sample(PLACES, 3)
    d1 = rng.choice(list(DIRECTIONS))
    d2 = rng.choice([d for d in DIRECTIONS if d not in (d1, DIRECTIONS[d1])])
    # a is d1 of b, and b is d2 of c: no direction from one place names two others
    relations = [(a, d1, b), (b, d2, c)]
    facts = [f"The {x} is {d} of the {y}." for x, d, y in relations]
    k = rng.randrange(2)
    x, d, y = relations[k]
    if rng.random() < 0.5:
        return Story(facts, f"What is {d} of the {y}?", f"{d.capitalize()} of the {y} is the", x, [k])
    return Story(facts, f"What is the {x} {d} of?", f"The {x} is {d} of the", y, [k])


def _qa5(rng: random.Random) -> Optional[Story]:
    w = World(rng, people=3)
    w.run(rng.randint(10, 25), {"move": 0.4, "take": 0.25, "drop": 0.1, "give": 0.35})
    if not w.gives:
        return None
    g, o, r, idx = w.gives[-1]

    def unique(match: Callable[[Tuple[str, str, str, int]], bool]) -> bool:
        return sum(1 for x in w.gives if match(x)) == 1

    forms = []
    if unique(lambda x: x[1] == o and x[2] == r):
        forms.append((f"Who gave the {o} to {r}?", f"The {o} was given to {r} by", g))
    if unique(lambda x: x[0] == g and x[1] == o):
        forms.append((f"Who did {g} give the {o} to?", f"{g} gave the {o} to", r))
    if unique(lambda x: x[0] == g and x[2] == r):
        forms.append((f"What did {g} give to {r}?", f"{g} gave {r} the", o))
    if unique(lambda x: x[1] == o):
        forms.append((f"Who received the {o}?", f"The {o} was received by", r))
        forms.append((f"Who gave the {o}?", f"The {o} was given by", g))
    if not forms:
        return None
    q, prefix, answer = rng.choice(forms)
    return Story(w.facts, q, prefix, answer, [idx])


STORIES: Dict[str, Callable[[random.Random], Optional[Story]]] = {
    "qa1": _qa1, "qa2": _qa2, "qa3": _qa3, "qa4": _qa4, "qa5": _qa5}


def story(task: str, rng: random.Random) -> Story:
    for _ in range(1000):  # a story that asks nothing answerable is drawn again
        s = STORIES[task](rng)
        if s is not None:
            return s
    raise RuntimeError(f"{task}: no answerable story drawn")


def make_babilong(task: str, seed: int, index: int, length: int, tok: TextTokenizer, depth: Optional[float] = None,
                  data=None) -> Sample:
    """The story's facts, in order, at seeded random places in background text filling ``length`` tokens;
    ``depth`` is where the last supporting fact landed. BABILong places facts at random, so no depth is taken."""
    rng = sample_rng(task, seed, index, length)
    st = story(task, rng)
    depths = sorted(rng.random() for _ in st.facts)
    intro = ("The text below hides facts about people, places and objects among unrelated sentences. Read it "
             "and answer the question that follows using only those facts.")
    query = f"Question: {st.question}\nAnswer: {st.prefix}"
    hay = Haystack(f"{task}|{seed}|{length}|{index}|hay", "essay")

    def build(n: int) -> Tuple[str, str]:
        text = insert_at_depths(hay.words(n), hay.boundaries(n), list(zip(depths, st.facts)))
        return f"{intro}\n\n{text}\n", query

    _, context, query, tokens = fit(tok, build, length)
    return Sample(context, query, [st.answer], f" {st.answer}.", tokens, depths[max(st.supporting)])


GENERATORS = {name: make_babilong for name in STORIES}
