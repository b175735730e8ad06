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
