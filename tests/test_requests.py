"""Request parsing in-process: the chat template split between phase 1 and phase 2, lines that are not UTF-8,
duplicate ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from star_mcore.config import InferenceConfig
from star_mcore.inference.requests import IdTracker, Request, Tokenizer, parse_request

INF = InferenceConfig(tokens_to_generate=4)
TEMPLATE = ("{{ bos_token }}{% for m in messages %}alpha {{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %} bravo{% endif %}")


def test_chat_template_wraps_the_turn_and_cuts_at_the_query(text_ckpt, tmp_path):
    ckpt = Path(shutil.copytree(text_ckpt, tmp_path / "chat"))
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    tok = Tokenizer(str(ckpt), chat=True)
    assert tok.has_chat_template() and not Tokenizer(text_ckpt).has_chat_template()
    line = json.dumps({"id": 1, "context": "charlie delta", "query": " echo"})
    req = parse_request(line, 1, tok, 101, 512, INF)
    # phase 1 gets BOS + the template's opening + the context; phase 2 the query + the assistant header
    assert req.context_ids == [1] + tok.encode("alpha charlie delta", add_bos=False)
    assert req.query_ids == tok.encode(" echo bravo", add_bos=False)
    assert tok.prompt("charlie delta", " echo") == (req.context_ids, req.query_ids)  # the one way, also for eval
    plain = parse_request(line, 1, Tokenizer(str(ckpt)), 101, 512, INF)
    assert plain.context_ids == [1] + tok.encode("charlie delta", add_bos=False)


def test_a_line_that_is_not_utf8_is_its_requests_error_and_a_bom_is_ignored(text_ckpt):
    tok = Tokenizer(text_ckpt)
    bad = parse_request(b'{"id": "x", "context": "\xff\xfe", "query": "q"}', 3, tok, 101, 512, INF)
    assert (bad.id, bad.error) == ("line-3", "line 3 is not valid UTF-8 (byte 25: b'\\xff')")
    ok = parse_request(b'\xef\xbb\xbf{"id": "y", "context_ids": [1, 2], "query_ids": [3]}', 1, tok, 101, 512, INF)
    assert (ok.id, ok.error, ok.context_ids, ok.query_ids) == ("y", None, [1, 2], [3])


def test_duplicate_ids_get_an_error_line_once_even_across_a_resume(tmp_path):
    """The first request with an id runs, a later one gets an error line saying why; a resumed run skips as
    many requests with an id as the output already answered, so the error line is neither repeated nor lost."""
    def run(output: Path):
        ids = IdTracker(str(output))
        out = []
        for n, rid in enumerate(["a", "b", "a", "a"], start=1):
            req = Request(rid)
            if ids.admit(req, n):
                out.append((n, req.error))
        return out

    out = tmp_path / "out.jsonl"
    first = run(out)
    assert [n for n, _ in first] == [1, 2, 3, 4] and first[0][1] is None and first[1][1] is None
    assert first[2][1] == first[3][1] == ('duplicate id "a": line 1 has the same id; give each request its own id '
                                          "(results are matched to requests by id)")
    out.write_text(json.dumps({"id": "a", "generated_ids": [1]}) + "\n")  # a run stopped after line 1
    assert run(out) == first[1:]
    with open(out, "a") as f:
        f.write(json.dumps({"id": "b", "generated_ids": [1]}) + "\n" + json.dumps({"id": "a", "error": "dup"}) + "\n")
    assert run(out) == first[3:]


def test_sampling_fields_override_the_defaults_and_bad_values_are_the_requests_error(tmp_path):
    from star_mcore.config import SamplingConfig

    inf = InferenceConfig(tokens_to_generate=4, sampling=SamplingConfig(temperature=0.5, top_p=0.8, logprobs=2))
    tok = Tokenizer(str(tmp_path))  # no tokenizer: stop strings are refused
    line = lambda **kw: json.dumps({"id": "r", "context_ids": [1, 2], "query_ids": [3], **kw})  # noqa: E731
    req = parse_request(line(temperature=0, top_k=3, seed=7, stop_token_ids=[5], tokens_to_generate=9), 1, tok,
                        101, 512, inf)
    assert (req.error, req.temperature, req.top_k, req.top_p, req.seed, req.stop_token_ids, req.logprobs,
            req.tokens_to_generate) == (None, 0, 3, 0.8, 7, (5,), 2, 9)
    bad = {
        "temperature": (dict(temperature=-1), "temperature must be a number >= 0, got -1"),
        "top_p": (dict(top_p=0), "top_p must be in (0, 1], got 0"),
        "top_k": (dict(top_k=1.5), "top_k must be an integer >= 0 (0: no limit), got 1.5"),
        "seed": (dict(seed=-3), "seed must be an integer in [0, 2**63), got -3"),
        "logprobs": (dict(logprobs=21), "logprobs must be an integer in [0, 20], got 21"),
        "budget": (dict(tokens_to_generate=0), "tokens_to_generate must be an integer >= 1, got 0"),
        "stop ids": (dict(stop_token_ids=[101]), "stop_token_ids has token id 101 outside the vocabulary [0, 101)"),
        "stop type": (dict(stop=[""]), "stop must be a string or a list of non-empty strings"),
        "typo": (dict(temprature=1), "unknown field 'temprature' (a request has: id, context_ids, query_ids, "
                                     "context, query, tokens_to_generate, temperature, top_k, top_p, seed, stop, "
                                     "stop_token_ids, logprobs)"),
    }
    for name, (fields, message) in bad.items():
        assert parse_request(line(**fields), 1, tok, 101, 512, inf).error == message, name
    no_tok = parse_request(line(stop="\n"), 1, tok, 101, 512, inf).error
    assert no_tok.startswith("stop strings, but") and "use stop_token_ids instead" in no_tok


def test_seeds_without_a_request_seed_are_stable_per_id_and_apart_between_ids():
    from star_mcore.inference.requests import resolved_seed

    a, b = Request("a"), Request("b")
    assert resolved_seed(a, 0) == resolved_seed(Request("a"), 0) != resolved_seed(b, 0)
    assert resolved_seed(a, 0) != resolved_seed(a, 1) and 0 <= resolved_seed(a, 0) < 2 ** 63
    assert resolved_seed(Request("c", seed=5), 0) == 5


def test_a_finished_file_is_put_in_input_order(tmp_path):
    from star_mcore.inference.requests import id_key, put_in_input_order

    out = tmp_path / "out.jsonl"
    lines = [{"id": "b", "generated_ids": [1]}, {"id": "a", "error": 'duplicate id "a": line 1 has the same id'},
             {"id": 3, "generated_ids": [2]}, {"id": "a", "generated_ids": [3]}]
    out.write_text("".join(json.dumps(x) + "\n" for x in lines))
    put_in_input_order(str(out), [id_key(x) for x in ("a", 3, "b", "a")])
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert got == [lines[3], lines[2], lines[0], lines[1]]  # the first "a" is the request, the second its duplicate
    assert not (tmp_path / "out.jsonl.tmp").exists()
