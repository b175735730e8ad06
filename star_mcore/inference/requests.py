"""Request and result JSONL: reading, tokenizing and checking requests; one output line per request.

Plain Python (no torch): ``eval-report`` reads result files through this module.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple


class RequestError(ValueError):
    """A problem with one request: reported in its output line; the other requests still run."""


@dataclass
class Request:
    id: Any
    context_ids: Optional[List[int]] = None
    query_ids: Optional[List[int]] = None
    text: bool = False  # came as text: the output gets decoded text too
    error: Optional[str] = None


class Tokenizer:
    """The checkpoint's tokenizer, loaded on first use (only text requests need it). ``chat``: prompts are
    wrapped in its chat template (``inference.apply_chat_template``)."""

    def __init__(self, hf_path: str, chat: bool = False) -> None:
        self.hf_path = hf_path
        self.chat = chat
        self._tok = None
        self._add_bos = True

    def _get(self):
        if self._tok is None:
            if not any((Path(self.hf_path) / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
                raise RequestError(f"text request, but {self.hf_path} has no tokenizer (tokenizer.json); "
                                   "send context_ids/query_ids instead")
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.hf_path, local_files_only=True)
            config = Path(self.hf_path) / "tokenizer_config.json"
            if config.is_file():  # a checkpoint that says its prompts start without BOS (SmolLM2) gets none
                self._add_bos = json.loads(config.read_text()).get("add_bos_token", True) is not False
        return self._tok

    def encode(self, text: str, add_bos: bool) -> List[int]:
        tok = self._get()
        ids = tok.encode(text, add_special_tokens=False)
        if add_bos and self._add_bos and tok.bos_token_id is not None:
            ids = [tok.bos_token_id] + ids
        return ids

    def prompt(self, context: str, query: str) -> Tuple[List[int], List[int]]:
        """The one way a text prompt becomes what the engine gets, for ``generate``, ``eval`` and the demo:
        (context ids for phase 1, query ids for phase 2). Plain: BOS + context, and the query tokenized
        apart; ``chat``: see :meth:`encode_chat`."""
        if self.chat:
            return self.encode_chat(context, query)
        return self.encode(context, add_bos=True), self.encode(query, add_bos=False)

    def decode(self, ids: List[int]) -> str:
        return self._get().decode(ids, skip_special_tokens=True)

    def has_chat_template(self) -> bool:
        try:
            return bool(getattr(self._get(), "chat_template", None))
        except RequestError:  # no tokenizer at all
            return False

    def encode_chat(self, context: str, query: str) -> Tuple[List[int], List[int]]:
        """The chat template applied to one user turn ``context + query`` (plus the assistant header), cut
        where the query starts: (context ids for phase 1, query ids for phase 2). The template's own special
        tokens (BOS, headers) come from the template, not added again."""
        tok = self._get()
        cut = "\uE000"  # a private-use character: never in real text
        text = tok.apply_chat_template([{"role": "user", "content": context + cut + query}], tokenize=False,
                                       add_generation_prompt=True)
        head, tail = text.split(cut, 1)
        return tok.encode(head, add_special_tokens=False), tok.encode(tail, add_special_tokens=False)


def _ids(value: Any, key: str, vocab_size: int) -> List[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise RequestError(f"{key} must be a list of integers")
    bad = [t for t in value if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"{key} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")
    return value


def parse_request(line: bytes | str, line_no: int, tokenizer: Tokenizer, vocab_size: int, max_positions: int,
                  tokens_to_generate: int) -> Request:
    """One JSONL line -> a Request (with ``error`` set instead of raising for anything wrong with it).
    Text requests go through ``tokenizer.prompt`` (the chat template where the tokenizer has ``chat``)."""
    rid: Any = f"line-{line_no}"
    try:
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise RequestError(f"line {line_no} is not valid UTF-8 (byte {e.start + 1}: "
                                   f"{line[e.start:e.start + 1]!r})") from None
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
            ctx_ids, qry_ids = tokenizer.prompt(obj["context"], obj["query"])
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


def read_lines(path: str) -> Iterator[Tuple[int, bytes]]:
    """(line number, bytes) of each non-blank line; :func:`parse_request` decodes them, so a line that is not
    UTF-8 is that request's error, not the run's."""
    with open(path, "rb") as f:
        for i, line in enumerate(f, start=1):
            if line.strip():
                yield i, line


def id_key(rid: Any) -> str:
    """Request ids may be any JSON value; compare them by their JSON text."""
    return json.dumps(rid, sort_keys=True)


class IdTracker:
    """Duplicate ids and resuming, by the order requests come in. The first request with an id runs; a later
    one with the same id gets an error line (results are matched to requests by id). A request is skipped on
    resume when the output already holds as many lines with its id as there were requests with it up to here,
    so a duplicate's error line is written once, and never lost when a run stops between the two."""

    def __init__(self, output_path: str) -> None:
        self.done = Counter(id_key(r["id"]) for r in read_records(output_path)
                            if "id" in r and ("generated_ids" in r or "error" in r))
        self.seen: Counter = Counter()
        self.first_line: Dict[str, int] = {}

    @property
    def finished(self) -> int:
        return sum(self.done.values())

    def admit(self, req: Request, line_no: int) -> bool:
        """Whether ``req`` still needs an output line; sets its error if it repeats an earlier id."""
        key = id_key(req.id)
        self.seen[key] += 1
        first = self.first_line.setdefault(key, line_no)
        if self.seen[key] > 1:
            req.error = (f"duplicate id {json.dumps(req.id)}: line {first} has the same id; give each request "
                         "its own id (results are matched to requests by id)")
        return self.seen[key] > self.done[key]


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
