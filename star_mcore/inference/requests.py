"""Request and result JSONL: reading, tokenizing and checking requests; one output line per request.

Plain Python (no torch): ``eval-report`` reads result files through this module.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ..config import InferenceConfig, sampling_problems


class RequestError(ValueError):
    """A problem with one request: reported in its output line; the other requests still run."""


SAMPLING_FIELDS = ("tokens_to_generate", "temperature", "top_k", "top_p", "seed", "stop", "stop_token_ids",
                   "logprobs")
FIELDS = ("id", "context_ids", "query_ids", "context", "query") + SAMPLING_FIELDS


@dataclass
class Request:
    id: Any
    context_ids: Optional[List[int]] = None
    query_ids: Optional[List[int]] = None
    text: bool = False  # came as text: the output gets decoded text too
    error: Optional[str] = None
    # generation settings: the config's defaults, overridden by the request's fields (seed None: not given)
    tokens_to_generate: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: Tuple[str, ...] = ()
    stop_token_ids: Tuple[int, ...] = ()
    logprobs: int = 0


_CUT = "\uE000"  # where a chat template's text is cut in two: a private-use character, never in real text


class Tokenizer:
    """The checkpoint's tokenizer, loaded on first use (only text requests need it). ``chat``: prompts are
    wrapped in its chat template (``inference.apply_chat_template``)."""

    def __init__(self, hf_path: str, chat: bool = False) -> None:
        self.hf_path = hf_path
        self.chat = chat
        self._tok = None
        self._add_bos = True

    def require(self, what: str = "text request") -> None:
        """Raise RequestError if the checkpoint has no tokenizer (``what`` needs one)."""
        if not any((Path(self.hf_path) / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
            raise RequestError(f"{what}, but {self.hf_path} has no tokenizer (tokenizer.json); "
                               + ("send context_ids/query_ids instead" if what == "text request" else
                                  "use stop_token_ids instead"))

    def _get(self):
        if self._tok is None:
            self.require()
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
        return self._template_cut([{"role": "user", "content": context + _CUT + query}])

    def encode_messages(self, messages: List[Dict[str, str]]) -> Tuple[List[int], List[int]]:
        """A chat's turns in the chat template, cut where the last message's content starts: (context ids: the
        turns before it, for phase 1; query ids: the last message and the assistant header, for phase 2)."""
        if not getattr(self._get(), "chat_template", None):
            raise RequestError(f"chat messages, but the tokenizer of {self.hf_path} has no chat template")
        turns = [dict(m) for m in messages]
        turns[-1]["content"] = _CUT + turns[-1]["content"]
        return self._template_cut(turns)

    def _template_cut(self, turns: List[Dict[str, str]]) -> Tuple[List[int], List[int]]:
        """``turns`` (one holding ``_CUT``) in the chat template with the generation prompt, tokenized on
        either side of the cut."""
        tok = self._get()
        text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        head, tail = text.split(_CUT, 1)
        return tok.encode(head, add_special_tokens=False), tok.encode(tail, add_special_tokens=False)


def _ids(value: Any, key: str, vocab_size: int) -> List[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise RequestError(f"{key} must be a list of integers")
    bad = [t for t in value if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"{key} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")
    return value


def _settings(obj: Dict[str, Any], inference: InferenceConfig, vocab_size: int) -> Dict[str, Any]:
    """The request's generation settings: the config's defaults with the request's own fields over them."""
    d = inference.sampling
    out = {"tokens_to_generate": obj.get("tokens_to_generate", inference.tokens_to_generate),
           "temperature": obj.get("temperature", d.temperature), "top_k": obj.get("top_k", d.top_k),
           "top_p": obj.get("top_p", d.top_p), "seed": obj.get("seed"), "logprobs": obj.get("logprobs", d.logprobs)}
    problems = sampling_problems(out["temperature"], out["top_k"], out["top_p"],
                                 0 if out["seed"] is None else out["seed"], out["logprobs"])
    n = out["tokens_to_generate"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        problems["tokens_to_generate"] = f"must be an integer >= 1, got {n!r}"
    if problems:
        key, problem = next(iter(problems.items()))
        raise RequestError(f"{key} {problem}")
    stop = obj.get("stop", list(d.stop))
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
        raise RequestError("stop must be a string or a list of non-empty strings")
    out["stop"] = tuple(stop)
    out["stop_token_ids"] = tuple(_ids(obj.get("stop_token_ids", list(d.stop_token_ids)), "stop_token_ids",
                                       vocab_size))
    return out


def parse_request(line: bytes | str, line_no: int, tokenizer: Tokenizer, vocab_size: int, max_positions: int,
                  inference: InferenceConfig) -> Request:
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
        unknown = sorted(set(obj) - set(FIELDS))
        if unknown:
            raise RequestError(f"unknown field {unknown[0]!r} (a request has: {', '.join(FIELDS)})")
        settings = _settings(obj, inference, vocab_size)
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
        budget = settings["tokens_to_generate"]
        total = len(ctx) + len(qry) + budget
        if total > max_positions:
            raise RequestError(f"context ({len(ctx)}) + query ({len(qry)}) + tokens_to_generate "
                               f"({budget}) = {total} exceeds the model's max positions ({max_positions})")
        if settings["stop"]:
            tokenizer.require("stop strings")
        return Request(rid, ctx, qry, text=text, **settings)
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


def resolved_seed(req: Request, default: int) -> int:
    """The request's seed, or one derived from the run's ``inference.sampling.seed`` and the request's id: a
    rerun (or a resumed run) draws the same tokens for it, and two requests draw independently."""
    if req.seed is not None:
        return req.seed
    digest = hashlib.sha256(f"{default}/{id_key(req.id)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def answer_text(tokenizer: Tokenizer, ids: List[int], req: Request) -> str:
    """The answer's text: without a final stop token, and cut before the first stop string it contains."""
    if ids and ids[-1] in req.stop_token_ids:
        ids = ids[:-1]
    text = tokenizer.decode(ids)
    cut = min((i for i in (text.find(s) for s in req.stop) if i >= 0), default=len(text))
    return text[:cut]


def put_in_input_order(path: str, order: List[str]) -> None:
    """Rewrite a finished results file in the order of ``order`` (the id keys of the input's lines, repeats
    included); lines are written as requests end, which with batching is not input order. Atomic: the file is
    replaced only once the new one is complete, so a stop during the rewrite loses nothing."""
    p = Path(path)
    lines = p.read_text(encoding="utf-8").splitlines(keepends=True)
    by_id: Dict[str, List[Tuple[bool, str]]] = {}
    for line in lines:
        try:
            rec = json.loads(line)
            key = id_key(rec["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        # a repeated id: the first request's line first, then the later ones' duplicate-id errors
        by_id.setdefault(key, []).append((str(rec.get("error", "")).startswith("duplicate id "), line))
    by_id = {k: [line for _, line in sorted(v, key=lambda x: x[0])] for k, v in by_id.items()}
    out = [by_id[k].pop(0) for k in order if by_id.get(k)]
    out += [x for rest in by_id.values() for x in rest]  # lines of ids no longer in the input stay, at the end
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("".join(out), encoding="utf-8")
    os.replace(tmp, p)
