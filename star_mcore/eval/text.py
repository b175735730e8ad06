"""Offline text for the synthetic tasks and fitting a prompt to a token budget.

The haystack is generated, not downloaded: a seeded grammar of a few hundred English words writes an endless
run of plain sentences. It serves as RULER's "essay" haystack and as BABILong's background text. Its word lists
share nothing with the BABILong simulator's people, places, objects and verbs, so no background sentence can
be mistaken for a fact. A fixed five-sentence paragraph, repeated, is the "noise" haystack.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable, List, Optional, Protocol, Sequence, Tuple


class TextTokenizer(Protocol):
    """What the generators need of a tokenizer (``inference.requests.Tokenizer`` is one): a prompt's
    (context ids, query ids) as the engine gets them."""

    def prompt(self, context: str, query: str) -> Tuple[List[int], List[int]]: ...


def prompt_tokens(tok: TextTokenizer, context: str, query: str) -> int:
    """Tokens the engine gets: the context (phase 1) and the query (phase 2), as ``tok.prompt`` makes them (BOS
    + context and the query tokenized apart, or both inside the chat template)."""
    ctx, qry = tok.prompt(context, query)
    return len(ctx) + len(qry)


@dataclass
class Sample:
    context: str  # phase 1: instructions and the haystack with what is hidden in it
    query: str  # phase 2: the question and the answer prefix
    references: List[str]  # what the prediction is scored against
    answer: str  # the canonical completion after the query (the probe model's training target)
    tokens: int  # prompt tokens as the engine gets them; <= the requested length
    depth: Optional[float] = None  # where the (first) answer was hidden: 0 = start of the haystack, 1 = end


ADJECTIVES = """ancient bright calm careful clever cold crooked curious damp dark distant dusty eager early empty
faint famous fierce fragile gentle golden grey hidden hollow honest humble little lonely loud narrow noble odd pale
patient plain polite proud quiet rapid rare rough rusty shallow sharp shy silent silver simple sleepy slow small
smooth soft steady strange sturdy tall tender tiny warm weary wild wise wooden young bitter brave broad busy cheerful
clumsy cozy crisp deep dull fair fancy fresh gloomy grand heavy jolly kind lively mighty modest muddy neat nervous
plump pretty rich royal sandy scarlet shiny sour spare stern sunny swift thin tidy vast""".split()

ROLES = """baker sailor farmer painter merchant teacher miller weaver potter fisher hunter shepherd traveler stranger
child widow captain poet scholar smith owl rabbit sparrow wolf whale dragon""".split()
THINGS = """lantern basket bridge candle cart chair cloak cottage field fence forest fountain gate harbor hill island
lake letter map market meadow mill mountain orchard path pond river road roof rope shore shelf ship stone stream
table tower valley village wagon wall well window wheel barn bell book boat coat drum feather flag kettle ladder
mirror pebble pillow ribbon saddle shovel song story thread tune whistle anchor arrow banner barrel blanket bottle
bucket button cabin canyon castle cellar chimney cliff clock cloud compass crown cup desk engine fiddle forge glove
hammer helmet horn jar knot lamp nest oar parcel pearl piano pipe quilt raft sack scarf shell sled spoon statue
steeple tent torch trumpet tunnel violin wand willow""".split()
NOUNS = ROLES + THINGS

_VERBS_T = """admired borrowed built carried cleaned covered crossed described discovered followed guarded mended
noticed opened painted polished pulled pushed remembered repaired searched shared sold studied touched visited
washed watched wrapped sketched measured counted praised""".split()
_VERBS_I = ("rested waited wandered laughed sang slept listened paused smiled whispered worked hummed sighed "
            "lingered").split()
_ADVERBS = """slowly quietly gladly softly carefully briefly gently often rarely proudly patiently suddenly calmly
silently eagerly""".split()
_PREPS = "near beside behind below above across along beyond under around through toward".split()
_TIMES = ["at dawn", "at dusk", "in the morning", "in the evening", "at noon", "in spring", "in winter",
          "in autumn", "in summer", "after the rain", "before the storm", "during the fair", "long ago", "that year"]

_TEMPLATES = [
    "the {a} {s} {vt} the {n} {p} the {n}.",
    "{t}, the {s} {vi} {adv}.",
    "a {a} {s} {vi} {p} the {a} {n}.",
    "nobody knew why the {s} {vt} the {a} {n}.",
    "the {s} and the {s} {vt} the {n} together.",
    "it was {a} and {a} {p} the {n} that day.",
    "every {n} {p} the {n} was {a}.",
    "{t}, a {s} {vt} an old {n} and {vi} {adv}.",
    "the {s} {vi} {adv} while the {s} {vt} the {n}.",
    "some said the {n} {p} the {n} was {a}, but the {s} {vi}.",
]

_NOISE = ["The hills are green.", "The river is slow.", "The road is long.", "On and on it goes.",
          "Back and forth again."]


def grammar_sentence(rng: random.Random) -> str:
    template = rng.choice(_TEMPLATES)
    pools = {"a": ADJECTIVES, "s": ROLES, "n": THINGS, "vt": _VERBS_T, "vi": _VERBS_I, "adv": _ADVERBS, "p": _PREPS,
             "t": _TIMES}
    out, i = [], 0
    while True:  # fill each {slot} with a fresh draw (str.format would reuse one value per name)
        j = template.find("{", i)
        if j < 0:
            out.append(template[i:])
            break
        k = template.index("}", j)
        out.append(template[i:j])
        out.append(rng.choice(pools[template[j + 1:k]]))
        i = k + 1
    s = "".join(out)
    return s[0].upper() + s[1:]


class Haystack:
    """An endless seeded run of sentences read as words. Prefixes are stable, so fitting can try any length;
    ``words(n)`` is the first n words (the last sentence may be cut) and ``boundaries(n)`` the word offsets in
    [0, n] where a sentence starts."""

    def __init__(self, seed: str, kind: str = "essay") -> None:
        if kind not in ("essay", "noise"):
            raise ValueError(f"unknown haystack kind {kind!r}")
        self._rng = random.Random(seed)
        self._kind = kind
        self._words: List[str] = []
        self._starts: List[int] = [0]

    def _grow(self, n: int) -> None:
        while len(self._words) < n:
            if self._kind == "essay":
                sentence = grammar_sentence(self._rng)
            else:
                sentence = _NOISE[(len(self._starts) - 1) % len(_NOISE)]
            self._words.extend(sentence.split())
            self._starts.append(len(self._words))

    def words(self, n: int) -> List[str]:
        self._grow(n)
        return self._words[:n]

    def boundaries(self, n: int) -> List[int]:
        # Only whole-sentence boundaries: a needle never lands inside the sentence the cut at n leaves unfinished.
        self._grow(n)
        return [b for b in self._starts if b <= n]


def insert_at_depths(words: Sequence[str], boundaries: Sequence[int], items: Sequence[Tuple[float, str]]) -> str:
    """``words`` joined with each item's text put at the sentence boundary nearest its depth (0..1)."""
    n = len(words)
    at: dict = {}
    for depth, text in items:
        b = min(boundaries, key=lambda x: (abs(x - depth * n), x))
        at.setdefault(b, []).append(text)
    out: List[str] = []
    for i in range(n + 1):
        out.extend(at.get(i, ()))
        if i < n:
            out.append(words[i])
    return " ".join(out)


def scatter(units: Sequence[str], items: Sequence[Tuple[float, str]]) -> List[str]:
    """``units`` with each item inserted before unit ``round(depth * len(units))``."""
    n = len(units)
    at: dict = {}
    for depth, text in items:
        at.setdefault(min(n, max(0, round(depth * n))), []).append(text)
    out: List[str] = []
    for i in range(n + 1):
        out.extend(at.get(i, ()))
        if i < n:
            out.append(units[i])
    return out


_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


def pseudo_word(rng: random.Random, syllables: int = 3) -> str:
    """A pronounceable made-up word (``bakumo``): an unbounded vocabulary for the word-counting tasks."""
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


def coded_word(rng: random.Random, length: int = 5) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))


def number7(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def uuid_text(rng: random.Random) -> str:
    h = "%032x" % rng.getrandbits(128)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def word_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def distinct(rng: random.Random, make: Callable[[random.Random], str], k: int,
             seen: Optional[set] = None) -> List[str]:
    """``k`` new values of ``make``, none of them in ``seen`` (which records them: callers drawing more later
    pass the same set)."""
    seen = set() if seen is None else seen
    out: List[str] = []
    misses = 0
    while len(out) < k:
        v = make(rng)
        if v in seen:
            misses += 1
            if misses > 1000:
                raise TooShort(f"ran out of distinct values after {len(seen)}")
            continue
        seen.add(v)
        out.append(v)
    return out


def join_and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class TooShort(ValueError):
    """The requested length cannot hold the task's fixed part."""


def fit(tok: TextTokenizer, build: Callable[[int], Tuple[str, str]], target: int,
        limit: Optional[int] = None) -> Tuple[int, str, str, int]:
    """The largest n (<= ``limit``) whose ``build(n) = (context, query)`` takes at most ``target`` prompt tokens.

    n counts filler units (haystack words, distractor needles, documents...). Token counts grow about linearly
    in n, so the search interpolates inside a bracket [fits, too long] that shrinks every step. Returns
    (n, context, query, tokens)."""
    seen: dict = {}

    def at(n: int) -> int:
        if n not in seen:
            ctx, qry = build(n)
            seen[n] = (prompt_tokens(tok, ctx, qry), ctx, qry)
        return seen[n][0]

    base = at(0)
    if base > target:
        raise TooShort(f"{target} tokens cannot hold the task's fixed part ({base} tokens)")
    lo, hi = 0, (None if limit is None else limit + 1)  # at(lo) fits; hi is too long (or past the limit)
    probe = 16 if limit is None else min(16, limit)
    rate = max((at(probe) - base) / probe, 1e-3) if probe else 1.0
    step = 0
    while hi is None or hi - lo > 1:
        if hi is not None and step % 4 == 3:
            n = (lo + hi) // 2  # a bisection now and then bounds the worst case
        else:
            n = lo + int((target - at(lo)) / rate)
            n = max(n, lo + 1) if hi is None else min(max(n, lo + 1), hi - 1)
        c = at(n)
        if c <= target:
            lo = n
        else:
            hi = n
        if hi is not None and hi in seen:
            rate = max((at(hi) - at(lo)) / (hi - lo), 1e-3)
        elif lo:
            rate = max((at(lo) - base) / lo, 1e-3)
        step += 1
    tokens, ctx, qry = seen[lo]
    return lo, ctx, qry, tokens
