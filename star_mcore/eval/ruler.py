"""RULER's 13 tasks (Hsieh et al., 2024), written here from the paper's task definitions: needle-in-a-haystack
variants, variable tracking, common and frequent word extraction, and QA over many documents.

Every generator is ``make(seed, index, length, tok, depth=None, data=None) -> Sample``: the same arguments give
the same text; the prompt (context + query, tokenized as the engine gets them) takes at most ``length`` tokens,
as many as whole filler units allow. ``depth`` (0..1) places the answer needle; None draws it from the seed.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .text import (Haystack, Sample, TextTokenizer, TooShort, coded_word, distinct, fit, insert_at_depths,
                   join_and, number7, prompt_tokens, pseudo_word, scatter, uuid_text, word_key)

DEPTHS = [i / 39 for i in range(40)]  # where a needle goes when no depth is asked for


def sample_rng(task: str, seed: int, index: int, length: int) -> random.Random:
    # A string seed is hashed with SHA-512: the same on every run, platform and rank.
    return random.Random(f"{task}|{seed}|{length}|{index}")


# --- needle in a haystack -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class NiahSpec:
    haystack: str  # essay | noise | needles
    key: str  # words | uuids
    value: str  # numbers | uuids
    keys: int = 1  # keys with needles (the queried ones plus distractors)
    values: int = 1  # needles (values) per key
    queries: int = 1  # keys asked about


NIAH = {
    "niah_single_1": NiahSpec("noise", "words", "numbers"),
    "niah_single_2": NiahSpec("essay", "words", "numbers"),
    "niah_single_3": NiahSpec("essay", "words", "uuids"),
    "niah_multikey_1": NiahSpec("essay", "words", "numbers", keys=4),
    "niah_multikey_2": NiahSpec("needles", "words", "numbers"),
    "niah_multikey_3": NiahSpec("needles", "uuids", "uuids"),
    "niah_multivalue": NiahSpec("essay", "words", "numbers", values=4),
    "niah_multiquery": NiahSpec("essay", "words", "numbers", keys=4, queries=4),
}

_MAKE = {"words": word_key, "numbers": number7, "uuids": uuid_text}


def needle(kind: str, key: str, value: str) -> str:
    return f"One of the special magic {kind} for {key} is: {value}."


def make_niah(task: str, seed: int, index: int, length: int, tok: TextTokenizer, depth: Optional[float] = None,
              data=None) -> Sample:
    spec = NIAH[task]
    rng = sample_rng(task, seed, index, length)
    kind = spec.value  # "numbers" or "uuids", as the needles name them
    one = kind[:-1]
    keys = distinct(rng, _MAKE[spec.key], spec.keys)
    values = {k: distinct(rng, _MAKE[spec.value], spec.values) for k in keys}
    first = rng.choice(DEPTHS) if depth is None else depth
    needles = [needle(kind, k, v) for k in keys for v in values[k]]
    depths = [first] + [rng.choice(DEPTHS) for _ in needles[1:]]
    asked = keys[:spec.queries]
    references = [v for k in asked for v in values[k]]
    plural = len(references) > 1

    intro = (f"Some special magic {kind} are hidden in the text below. Memorize them; you will be asked about "
             f"them afterwards." if plural or spec.keys > 1 or spec.haystack == "needles" else
             f"A special magic {one} is hidden in the text below. Memorize it; you will be asked for it afterwards.")
    about = join_and(asked)
    if plural:
        query = (f"Question: What are all the special magic {kind} for {about} mentioned in the text above?\n"
                 f"Answer: The special magic {kind} for {about} mentioned in the text above are")
    else:
        query = (f"Question: What is the special magic {one} for {about} mentioned in the text above?\n"
                 f"Answer: The special magic {one} for {about} mentioned in the text above is")

    if spec.haystack == "needles":
        # The haystack is made of needles: distractor keys with their own values, none of them asked about.
        fillers: List[str] = []
        taken = set(keys)

        def filler(n: int) -> List[str]:
            if len(fillers) < n:
                fillers.extend(needle(kind, k, _MAKE[spec.value](rng))
                               for k in distinct(rng, _MAKE[spec.key], n - len(fillers), taken))
            return fillers[:n]

        def build(n: int) -> Tuple[str, str]:
            return f"{intro}\n\n{' '.join(scatter(filler(n), list(zip(depths, needles))))}\n", query
    else:
        hay = Haystack(f"{task}|{seed}|{length}|{index}|hay", spec.haystack)

        def build(n: int) -> Tuple[str, str]:
            text = insert_at_depths(hay.words(n), hay.boundaries(n), list(zip(depths, needles)))
            return f"{intro}\n\n{text}\n", query

    _, context, query, tokens = fit(tok, build, length)
    return Sample(context, query, references, " " + join_and(references) + ".", tokens, first)


# --- variable tracking ----------------------------------------------------------------------------------------

def _var_name(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def make_vt(task: str, seed: int, index: int, length: int, tok: TextTokenizer, depth: Optional[float] = None,
            data=None, hops: int = 4) -> Sample:
    """One chain ``VAR A = 12345``, ``VAR B = VAR A``, ... (``hops`` assignments after the first) in noise; the
    answer is every variable that ends up holding the value. ``depth`` places the chain's first statement."""
    rng = sample_rng(task, seed, index, length)
    names = distinct(rng, _var_name, hops + 1)
    value = str(rng.randint(10_000, 99_999))
    statements = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    first = rng.choice(DEPTHS) if depth is None else depth
    depths = sorted([first] + [first + (1 - first) * rng.random() for _ in statements[1:]])
    intro = "Memorize and track the chain of variable assignments hidden in the following text."
    query = (f"Question: Find all variables that are assigned the value {value} in the text above.\n"
             f"Answer: According to the chain of variable assignments in the text above, {len(names)} variables "
             f"are assigned the value {value}, they are:")
    hay = Haystack(f"{task}|{seed}|{length}|{index}|hay", "noise")

    def build(n: int) -> Tuple[str, str]:
        text = insert_at_depths(hay.words(n), hay.boundaries(n), list(zip(depths, statements)))
        return f"{intro}\n\n{text}\n", query

    _, context, query, tokens = fit(tok, build, length)
    return Sample(context, query, names, " " + join_and(names) + ".", tokens, first)


# --- common and frequent words ----------------------------------------------------------------------------------

def make_cwe(task: str, seed: int, index: int, length: int, tok: TextTokenizer, depth: Optional[float] = None,
             data=None, common: int = 10) -> Sample:
    """A numbered list where ``common`` words appear ``freq_cw`` times and the rest ``freq_ucw`` times; name the
    common ones. RULER's 30 / 3 repetitions, fewer where the length cannot hold 30 of each common word."""
    rng = sample_rng(task, seed, index, length)
    taken: set = set()
    words: List[str] = distinct(rng, pseudo_word, common, taken)
    rare: List[str] = []

    def rare_words(n: int) -> List[str]:
        if len(rare) < n:
            rare.extend(distinct(rng, pseudo_word, n - len(rare), taken))
        return rare[:n]

    intro = ("Below is a numbered list of words. Some of them appear more often than the others. Memorize the "
             "ones that appear most often.")
    query = (f"Question: What are the {common} most common words in the list above?\n"
             f"Answer: The top {common} words that appear most often in the list are:")
    for freq_cw, freq_ucw in ((30, 3), (10, 2), (5, 1)):
        def build(n: int) -> Tuple[str, str]:
            items = words * freq_cw + rare_words(n) * freq_ucw
            random.Random(f"{task}|{seed}|{length}|{index}|{n}").shuffle(items)
            lines = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(items))
            return f"{intro}\n\n{lines}\n", query

        try:
            n, context, query, tokens = fit(tok, build, length)
        except TooShort:
            continue
        if n >= common:
            return Sample(context, query, list(words), " " + join_and(words) + ".", tokens)
    raise TooShort(f"{length} tokens cannot hold {task}'s list of words")


def make_fwe(task: str, seed: int, index: int, length: int, tok: TextTokenizer, depth: Optional[float] = None,
             data=None, alpha: float = 2.0, vocab: int = 800) -> Sample:
    """Coded words drawn from a zeta(``alpha``) distribution over a vocabulary; name the three most frequent."""
    rng = sample_rng(task, seed, index, length)
    codes = distinct(rng, coded_word, vocab)
    cum, total = [], 0.0
    for r in range(1, vocab + 1):
        total += r ** -alpha
        cum.append(total)
    stream: List[str] = []

    def text_of(n: int) -> List[str]:
        if len(stream) < n:
            stream.extend(rng.choices(codes, cum_weights=cum, k=n - len(stream)))
        return stream[:n]

    intro = ("Read the following coded text and track how often each coded word appears. You will be asked for "
             "the three most frequent coded words.")
    query = ("Question: What are the three most frequently appearing coded words in the text above?\n"
             "Answer: According to the coded text above, the three most frequently appearing words are:")

    def build(n: int) -> Tuple[str, str]:
        return f"{intro}\n\n{' '.join(text_of(n))}\n", query

    fitted, context, query, tokens = fit(tok, build, length)
    n = fitted
    while True:  # a tie for third place has no single answer: drop words until there is none
        ranked = Counter(text_of(n)).most_common(4)
        if len(ranked) > 3 and ranked[2][1] > ranked[3][1]:
            break
        n -= 1
        if n < 10:
            raise TooShort(f"{length} tokens cannot hold {task}'s coded text")
    if n != fitted:
        context, query = build(n)
        tokens = prompt_tokens(tok, context, query)
    top = [w for w, _ in ranked[:3]]
    return Sample(context, query, top, " " + join_and(top) + ".", tokens)


# --- question answering over documents ----------------------------------------------------------------------

@dataclass
class QAData:
    """Questions with their answers and golden documents, and the pool every document is drawn from."""

    questions: List[Tuple[str, List[str], List[str]]]  # (question, answers, golden documents)
    documents: List[str]


def make_qa(task: str, seed: int, index: int, length: int, tok: TextTokenizer, depth: Optional[float] = None,
            data: Optional[QAData] = None) -> Sample:
    """A question over numbered documents: its golden ones (the first at ``depth``) among distractors."""
    if data is None:
        raise ValueError(f"{task} needs its question file")
    rng = sample_rng(task, seed, index, length)
    question, answers, golden = data.questions[rng.randrange(len(data.questions))]
    gold = set(golden)
    first = rng.choice(DEPTHS) if depth is None else depth
    depths = [first] + [rng.choice(DEPTHS) for _ in golden[1:]]
    pool = [d for d in data.documents if d not in gold]
    rng.shuffle(pool)
    instruction = ("Answer the question based on the given documents. Only give me the answer and do not output "
                   "any other words.")
    query = f"{instruction}\n\nQuestion: {question}\nAnswer:"

    def build(n: int) -> Tuple[str, str]:
        docs = scatter(pool[:n], list(zip(depths, golden)))
        body = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
        return f"{instruction}\n\nThe following are given documents.\n\n{body}\n", query

    _, context, query, tokens = fit(tok, build, length, limit=len(pool))
    return Sample(context, query, list(answers), " " + answers[0], tokens, first)


def _unique(items: Sequence[str]) -> List[str]:
    return list(dict.fromkeys(items))


def load_squad(path: str) -> QAData:
    """SQuAD json (v1.1 or v2.0): every answerable question; its paragraph is the golden document."""
    import json

    questions, documents = [], []
    for article in json.loads(open(path, encoding="utf-8").read())["data"]:
        for para in article["paragraphs"]:
            documents.append(para["context"])
            for qa in para["qas"]:
                answers = _unique([a["text"] for a in qa.get("answers", []) if a["text"].strip()])
                if answers and not qa.get("is_impossible", False):
                    questions.append((qa["question"], answers, [para["context"]]))
    return QAData(questions, _unique(documents))


def load_hotpotqa(path: str) -> QAData:
    """HotpotQA json (a list of questions with ``context`` paragraphs): the supporting paragraphs are golden."""
    import json

    questions, documents = [], []
    for item in json.loads(open(path, encoding="utf-8").read()):
        paras = {title: f"{title}\n{''.join(sents)}" for title, sents in item["context"]}
        documents.extend(paras.values())
        titles = _unique([t for t, _ in item.get("supporting_facts", []) if t in paras]) or list(paras)[:1]
        questions.append((item["question"], [item["answer"]], [paras[t] for t in titles]))
    return QAData(questions, _unique(documents))


GENERATORS: Dict[str, Callable[..., Sample]] = {
    **{name: make_niah for name in NIAH},
    "vt": make_vt,
    "cwe": make_cwe,
    "fwe": make_fwe,
    "qa_1": make_qa,
    "qa_2": make_qa,
}
