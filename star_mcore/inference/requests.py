"""Request and result JSONL: reading, tokenizing and checking requests; one output line per request."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch


class RequestError(ValueError):
    """A problem with one request: reported in its output line; the other requests still run."""


@dataclass
class Request:
    id: Any
    context_ids: Optional[torch.Tensor] = None
    query_ids: Optional[torch.Tensor] = None
    text: bool = False  # came as text: the output gets decoded text too
    error: Optional[str] = None


class Tokenizer:
    """The checkpoint's tokenizer, loaded on first use (only text requests need it)."""

    def __init__(self, hf_path: str) -> None:
        self.hf_path = hf_path
        self._tok = None

    def _get(self):
        if self._tok is None:
            if not any((Path(self.hf_path) / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
                raise RequestError(f"text request, but {self.hf_path} has no tokenizer (tokenizer.json); "
                                   "send context_ids/query_ids instead")
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.hf_path, local_files_only=True)
        return self._tok

    def encode(self, text: str, add_bos: bool) -> List[int]:
        tok = self._get()
        ids = tok.encode(text, add_special_tokens=False)
        if add_bos and tok.bos_token_id is not None:
            ids = [tok.bos_token_id] + ids
        return ids

    def decode(self, ids: List[int]) -> str:
        return self._get().decode(ids, skip_special_tokens=True)

    def has_chat_template(self) -> bool:
        try:
            return bool(getattr(self._get(), "chat_template", None))
        except RequestError:  # no tokenizer at all
            return False

    def encode_chat(self, context: str, query: str) -> tuple:
        """The chat template applied to one user turn ``context + query`` (plus the assistant header), cut
        where the query starts: (context ids for phase 1, query ids for phase 2). The template's own special
        tokens (BOS, headers) come from the template, not added again."""
        tok = self._get()
        cut = "\uE000"  # a private-use character: never in real text
        text = tok.apply_chat_template([{"role": "user", "content": context + cut + query}], tokenize=False,
                                       add_generation_prompt=True)
        head, tail = text.split(cut, 1)
        return tok.encode(head, add_special_tokens=False), tok.encode(tail, add_special_tokens=False)


def _ids(value: Any, key: str, vocab_size: int) -> torch.Tensor:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise RequestError(f"{key} must be a list of integers")
    bad = [t for t in value if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"{key} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")
    return torch.tensor(value, dtype=torch.long)


def parse_request(line: str, line_no: int, tokenizer: Tokenizer, vocab_size: int, max_positions: int,
                  tokens_to_generate: int, chat: bool = False) -> Request:
    """One JSONL line -> a Request (with ``error`` set instead of raising for anything wrong with it)."""
    rid: Any = f"line-{line_no}"
    try:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RequestError(f"line {line_no} is not valid JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise RequestError(f"line {line_no} is not a JSON object")
        rid = obj.get("id", rid)
        text = False
        if "context_ids" in obj or "query_ids" in obj:
            ctx = _ids(obj.get("context_ids"), "context_ids", vocab_size)
            qry = _ids(obj.get("query_ids"), "query_ids", vocab_size)
        elif "context" in obj or "query" in obj:
            if not isinstance(obj.get("context"), str) or not isinstance(obj.get("query"), str):
                raise RequestError("context and query must both be strings")
            if chat:
                ctx_ids, qry_ids = tokenizer.encode_chat(obj["context"], obj["query"])
            else:
                ctx_ids = tokenizer.encode(obj["context"], add_bos=True)
                qry_ids = tokenizer.encode(obj["query"], add_bos=False)
            ctx, qry = _ids(ctx_ids, "context", vocab_size), _ids(qry_ids, "query", vocab_size)
            text = True
        else:
            raise RequestError('a request needs "context_ids" and "query_ids", or "context" and "query"')
        if len(ctx) == 0:
            raise RequestError("empty context")
        if len(qry) == 0:
            raise RequestError("empty query")
        total = len(ctx) + len(qry) + tokens_to_generate
        if total > max_positions:
            raise RequestError(f"context ({len(ctx)}) + query ({len(qry)}) + tokens_to_generate "
                               f"({tokens_to_generate}) = {total} exceeds the model's max positions ({max_positions})")
        return Request(rid, ctx, qry, text=text)
    except RequestError as e:
        return Request(rid, error=str(e))


def read_lines(path: str) -> Iterator[tuple]:
    """(line number, text) of each non-blank line."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if line.strip():
                yield i, line


def id_key(rid: Any) -> str:
    """Request ids may be any JSON value; compare them by their JSON text."""
    return json.dumps(rid, sort_keys=True)


def read_records(path: str) -> Iterator[Dict[str, Any]]:
    """The JSON objects of a results file, one a line; a torn line (a run died while writing it) is skipped,
    and a missing file has none."""
    if not Path(path).is_file():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                yield rec


def finished_ids(path: str) -> set:
    """Keys of the requests already answered (result or error) in an existing output file."""
    return {id_key(r["id"]) for r in read_records(path) if "id" in r and ("generated_ids" in r or "error" in r)}


class ResultWriter:
    """Appends one JSON line per request and flushes it at once, so nothing finished is lost. An existing
    file is continued (a torn last line from an interrupted run is cut off first)."""

    def __init__(self, path: str) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_file():
            data = p.read_bytes()
            if data and not data.endswith(b"\n"):
                p.write_bytes(data[: data.rfind(b"\n") + 1])
        self._f = open(p, "a", encoding="utf-8")

    def write(self, record: Dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()
