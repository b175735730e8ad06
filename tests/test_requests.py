"""Request parsing in-process: the chat template split between phase 1 and phase 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from star_mcore.inference.requests import Tokenizer, parse_request

TEMPLATE = ("{{ bos_token }}{% for m in messages %}alpha {{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %} bravo{% endif %}")


def test_chat_template_wraps_the_turn_and_cuts_at_the_query(text_ckpt, tmp_path):
    ckpt = Path(shutil.copytree(text_ckpt, tmp_path / "chat"))
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    tok = Tokenizer(str(ckpt))
    assert tok.has_chat_template() and not Tokenizer(text_ckpt).has_chat_template()
    line = json.dumps({"id": 1, "context": "charlie delta", "query": " echo"})
    req = parse_request(line, 1, tok, 101, 512, 4, chat=True)
    ctx, qry = req.context_ids.tolist(), req.query_ids.tolist()
    # phase 1 gets BOS + the template's opening + the context; phase 2 the query + the assistant header
    assert ctx == [1] + tok.encode("alpha charlie delta", add_bos=False)
    assert qry == tok.encode(" echo bravo", add_bos=False)
    plain = parse_request(line, 1, tok, 101, 512, 4, chat=False)
    assert plain.context_ids.tolist() == [1] + tok.encode("charlie delta", add_bos=False)
