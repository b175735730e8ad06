"""The offline generators and RULER's scoring: deterministic, the answer really in the context where asked,
the prompt as long as asked (never longer), and scores as RULER counts them."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

from star_mcore.eval import babilong
from star_mcore.eval.ruler import NIAH, load_hotpotqa, load_squad
from star_mcore.eval.scoring import string_match_all, string_match_part
from star_mcore.eval.tasks import BENCHMARKS, TASKS, select
from star_mcore.eval.text import ADJECTIVES, NOUNS, Haystack, TooShort, fit, grammar_sentence, prompt_tokens

SYNTHETIC = [t for t in TASKS if not t.startswith("qa_")]
LENGTH = 1500
# how far below the target a prompt may end: one filler unit (a word, a list entry, a needle, a document)
SLACK = {"cwe": 30, "niah_multikey_2": 40, "niah_multikey_3": 90, "qa_1": 200, "qa_2": 200}


class Tok:
    """A small byte-level BPE trained on the generators' own text, with a BOS id like a real checkpoint's."""

    def __init__(self, path):
        from tokenizers import Tokenizer

        self.t = Tokenizer.from_file(str(path / "tokenizer.json"))

    def encode(self, text, add_bos):
        return ([1] if add_bos else []) + self.t.encode(text, add_special_tokens=False).ids

    def prompt(self, context, query):
        return self.encode(context, True), self.encode(query, False)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from star_mcore.model.tiny import train_tiny_tokenizer

    path = tmp_path_factory.mktemp("tok")
    texts = [TASKS[t].make(0, i, 400, _Words()).context for t in SYNTHETIC for i in range(3)]
    train_tiny_tokenizer(path, texts, vocab_size=600)
    return Tok(path)


class _Words:
    def prompt(self, context, query):
        return context.split(), query.split()


def _haystack_span(context):
    start = context.index("\n\n") + 2
    return start, len(context.rstrip("\n"))


@pytest.mark.parametrize("task", SYNTHETIC)
def test_same_arguments_same_text_and_the_length_asked_for(task, tok):
    t = TASKS[task]
    a, b, other = t.make(0, 5, LENGTH, tok), t.make(0, 5, LENGTH, tok), t.make(0, 6, LENGTH, tok)
    assert (a.context, a.query, a.references) == (b.context, b.query, b.references)
    assert (a.context, a.references) != (other.context, other.references)
    assert t.make(1, 5, LENGTH, tok).context != a.context  # the seed matters
    assert a.tokens == prompt_tokens(tok, a.context, a.query)
    assert LENGTH - SLACK.get(task, 8) <= a.tokens <= LENGTH
    for ref in a.references:
        assert ref in a.context and ref in a.answer
        assert string_match_all(a.answer, a.references) == 1.0


@pytest.mark.parametrize("task", list(NIAH))
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.75, 1.0])
def test_needle_sits_at_the_requested_depth(task, depth, tok):
    s = TASKS[task].make(0, 2, 3000, tok, depth=depth)
    assert s.depth == depth
    value = s.references[0]
    key = re.search(r"for (.+?) mentioned", s.query).group(1).split(", ")[0].split(" and ")[0]
    needle = f"One of the special magic {NIAH[task].value} for {key} is: {value}."
    assert s.context.count(needle) == 1
    start, end = _haystack_span(s.context)
    at = s.context.index(needle)
    position = (at - start) / (end - start - len(needle))
    assert abs(position - depth) < 0.05, (position, depth)


def test_multi_needle_tasks_hide_every_answer_once(tok):
    for task in ("niah_multikey_1", "niah_multivalue", "niah_multiquery", "niah_multikey_2"):
        s = TASKS[task].make(0, 1, 2000, tok)
        assert len(s.references) == (4 if task in ("niah_multivalue", "niah_multiquery") else 1)
        for v in s.references:
            assert s.context.count(f"is: {v}.") == 1
    # distractor keys are never the asked one
    s = TASKS["niah_multikey_1"].make(0, 1, 2000, tok)
    key = re.search(r"for (.+?) mentioned", s.query).group(1)
    assert len(re.findall(r"for ([\w-]+) is:", s.context)) == 4
    assert re.findall(r"for ([\w-]+) is:", s.context).count(key) == 1


def test_variable_tracking_chain_resolves_to_the_references(tok):
    s = TASKS["vt"].make(0, 3, 2000, tok)
    value = re.search(r"assigned the value (\d+)", s.query).group(1)
    env = {}
    for name, rhs in re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", s.context):
        env[name] = env[rhs[4:]] if rhs.startswith("VAR ") else rhs
    assert sorted(n for n, v in env.items() if v == value) == sorted(s.references)
    assert len(s.references) == 5


def test_common_and_frequent_words_are_really_the_most_frequent(tok):
    s = TASKS["cwe"].make(0, 0, 3000, tok)
    counts = Counter(re.findall(r"^\d+\. (\w+)$", s.context, flags=re.M))
    top = sorted(counts.values(), reverse=True)
    assert {w for w in s.references} == {w for w, c in counts.items() if c == top[0]}
    assert len(s.references) == 10 and top[9] > top[10]
    s = TASKS["fwe"].make(0, 0, 3000, tok)
    body = s.context.split("\n\n", 1)[1]
    ranked = Counter(body.split()).most_common()
    assert [w for w, _ in ranked[:3]] == s.references and ranked[2][1] > ranked[3][1]


def _solve(task, context, question):
    """An independent reading of the facts in the context: the answer bAbI expects."""
    body = context.split("\n\n", 1)[1]
    facts = [f for f in re.split(r"(?<=\.) ", body) if f.split()[0] in babilong.PEOPLE]
    where, holder, placed = {}, {}, {}
    for f in facts:
        w = f.strip().rstrip(".").split()
        p = w[0]
        if w[-2] == "the" and w[-1] in babilong.PLACES:
            where[p] = w[-1]
        elif w[-1] == "there":
            holder[w[-2]] = p
        elif w[-2] == "to" and w[-1] in babilong.PEOPLE:
            holder[w[-3]] = w[-1]
        else:
            holder.pop(w[-1], None)
            placed[w[-1]] = where[p]
    if task == "qa1":
        return where[question.split()[2].rstrip("?")]
    obj = question.split()[3].rstrip("?")
    return where[holder[obj]] if obj in holder else placed[obj]


@pytest.mark.parametrize("task", ["qa1", "qa2"])
def test_babilong_answers_follow_from_the_facts_in_the_context(task, tok):
    for i in range(10):
        s = TASKS[task].make(0, i, 1200, tok)
        question = s.query.split("\n")[0][len("Question: "):]
        assert _solve(task, s.context, question) == s.references[0]


@pytest.mark.parametrize("task", BENCHMARKS["babilong"])
def test_babilong_facts_stand_apart_from_the_background(task, tok):
    s = TASKS[task].make(0, 4, 2000, tok)
    sentences = re.split(r"(?<=\.) ", s.context.split("\n\n", 1)[1].strip())
    facts = [x for x in sentences if set(re.findall(r"\w+", x.lower())) & babilong.FACT_WORDS]
    assert facts, "no fact in the context"
    assert s.references[0] in " ".join(facts)
    assert 0.0 <= s.depth <= 1.0


def test_background_never_names_what_the_facts_name():
    rng = random.Random(7)
    background = {w.lower() for w in ADJECTIVES + NOUNS}
    background |= {w for _ in range(3000) for w in re.findall(r"[a-z]+", grammar_sentence(rng).lower())}
    assert not background & babilong.FACT_WORDS


def test_qa_tasks_read_local_squad_and_hotpotqa_files(tmp_path, tok):
    squad = {"data": [{"title": "t", "paragraphs": [
        {"context": f"Paragraph {i} tells that the river number {i} is called Name{i}.",
         "qas": [{"question": f"What is river {i} called?", "answers": [{"text": f"Name{i}"}]},
                 {"question": "Unanswerable?", "answers": [], "is_impossible": True}]} for i in range(300)]}]}
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    data = load_squad(str(tmp_path / "squad.json"))
    assert len(data.questions) == 300 and len(data.documents) == 300
    s = TASKS["qa_1"].make(0, 0, 2000, tok, depth=0.5, data=data)
    i = int(re.search(r"river (\d+) called", s.query).group(1))
    golden = f"Paragraph {i} tells"
    assert s.references == [f"Name{i}"] and s.context.count(golden) == 1
    docs = re.findall(r"Document \d+:\n(.*)", s.context)
    assert abs([k for k, d in enumerate(docs) if d.startswith(golden)][0] / (len(docs) - 1) - 0.5) < 0.1
    assert 2000 - SLACK["qa_1"] <= s.tokens <= 2000

    hotpot = [{"question": f"Which town {i}?", "answer": f"Town{i}",
               "supporting_facts": [[f"A{i}", 0], [f"B{i}", 0]],
               "context": [[f"A{i}", [f"A{i} is a place. ", "It is old."]], [f"B{i}", [f"Town{i} is near A{i}."]],
                           [f"C{i}", ["Nothing here."]]]} for i in range(100)]
    (tmp_path / "hotpot.json").write_text(json.dumps(hotpot))
    data = load_hotpotqa(str(tmp_path / "hotpot.json"))
    s = TASKS["qa_2"].make(0, 0, 1500, tok, data=data)
    i = int(re.search(r"town (\d+)", s.query).group(1))
    assert f"A{i}\nA{i} is a place. It is old." in s.context and f"B{i}\nTown{i} is near A{i}." in s.context
    assert string_match_part(f"It is Town{i}.", s.references) == 1.0


def test_fit_finds_the_largest_filler_that_fits_and_refuses_what_cannot():
    class Chars:
        def prompt(self, context, query):
            return list(context), list(query)

    build = lambda n: ("x" * (10 + 3 * n), "q")  # noqa: E731 - 11 + 3n tokens
    n, ctx, qry, tokens = fit(Chars(), build, 1000)
    assert tokens == 11 + 3 * n <= 1000 < 11 + 3 * (n + 1)
    assert fit(Chars(), build, 1000, limit=50)[0] == 50
    with pytest.raises(TooShort):
        fit(Chars(), build, 10)
    with pytest.raises(TooShort):
        TASKS["cwe"].make(0, 0, 100, _Words())


def test_haystack_prefixes_are_stable():
    a, b = Haystack("s"), Haystack("s")
    assert a.words(50) == b.words(500)[:50]
    assert set(a.boundaries(200)) <= set(range(201)) and a.boundaries(200)[0] == 0


@pytest.mark.parametrize("prediction,refs,all_,part", [
    ("The number is 1234567.", ["1234567"], 1.0, 1.0),
    ("nothing useful", ["1234567"], 0.0, 0.0),
    ("KITCHEN", ["kitchen"], 1.0, 1.0),  # case does not matter
    ("abc, def", ["abc", "def", "ghi", "jkl"], 0.5, 1.0),
    ("", ["a b"], 0.0, 0.0),
    ("Paris or London", ["London", "Londres"], 0.5, 1.0),
])
def test_scoring_matches_hand_counts(prediction, refs, all_, part):
    assert string_match_all(prediction, refs) == all_
    assert string_match_part(prediction, refs) == part


def test_tasks_are_the_benchmarks_and_strangers_are_named():
    assert len(BENCHMARKS["ruler"]) == 13 and BENCHMARKS["babilong"] == ["qa1", "qa2", "qa3", "qa4", "qa5"]
    assert [t.metric for t in select("ruler", ["qa_1", "vt"])] == ["string_match_part", "string_match_all"]
    with pytest.raises(ValueError, match="nope not in babilong"):
        select("babilong", ["qa1", "nope"])
