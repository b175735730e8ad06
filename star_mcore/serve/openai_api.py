"""OpenAI's request and response shapes, turned into this project's: a completion or chat body becomes the
fields of a ``generate`` request (checked by :func:`..inference.requests.parse_request`, so the server and
``generate`` refuse the same things with the same messages), and a request's tokens become OpenAI's JSON.

Plain Python (no torch, no HTTP): the front end imports it, and the tests.
"""

from __future__ import annotations

import json
import time
from typing import Any, Dict, List, Optional, Tuple

from ..inference.requests import SAMPLING_FIELDS, Request, RequestError, Tokenizer, answer_text

# Fields OpenAI's clients may send that change nothing here at these values: accepted only at them.
NEUTRAL = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "echo": False, "best_of": 1, "logit_bias": {},
           "suffix": None, "user": None, "parallel_tool_calls": None, "service_tier": None, "store": False,
           "metadata": None}
COMMON = ("model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options",
          "logprobs") + tuple(NEUTRAL)
COMPLETION_FIELDS = COMMON + ("prompt", "context")
CHAT_FIELDS = COMMON + ("messages", "top_logprobs", "max_completion_tokens")


class ApiError(Exception):
    """A request the server answers with an error status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _bad(message: str, param: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param)


def request_error(e: RequestError) -> ApiError:
    """``parse_request``'s refusal as a 400; ``param`` is the field its message starts with, where it does."""
    first = str(e).split(" ", 1)[0]
    param = {"tokens_to_generate": "max_tokens"}.get(first, first if first in SAMPLING_FIELDS else None)
    return _bad(str(e), param)


def _common(body: Dict[str, Any], allowed: Tuple[str, ...], model: str) -> Dict[str, Any]:
    """The checks every endpoint makes, and the sampling fields in ``generate``'s names."""
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise _bad(f"unknown field {unknown[0]!r} (supported: {', '.join(sorted(set(allowed) - set(NEUTRAL)))})",
                   unknown[0])
    if body.get("n", 1) not in (1, None):
        raise _bad(f"n must be 1: this server returns one choice per request (got {body['n']!r})", "n")
    for key, neutral in NEUTRAL.items():
        if key != "n" and body.get(key, neutral) not in (neutral, None):
            raise _bad(f"{key} is not supported (only {json.dumps(neutral)})", key)
    if "model" in body and body["model"] != model:
        raise ApiError(404, f"The model {body['model']!r} does not exist (this server has {model!r})", "model",
                       "model_not_found")
    if not isinstance(body.get("stream", False), bool):
        raise _bad("stream must be true or false", "stream")
    out = {k: body[k] for k in ("temperature", "top_p", "top_k", "seed", "stop") if body.get(k) is not None}
    budget = body.get("max_completion_tokens", body.get("max_tokens"))
    if budget is not None:
        out["tokens_to_generate"] = budget
    return out


def completion_request(body: Dict[str, Any], model: str) -> Dict[str, Any]:
    """``POST /v1/completions`` -> the fields of a ``generate`` request: ``prompt`` is the query, the extension
    field ``context`` the context (each a string, or a list of token ids)."""
    out = _common(body, COMPLETION_FIELDS, model)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a list (the OpenAI client's batch form) is that prompt
    if "context" not in body:
        raise _bad('a completion needs "context" (the document, encoded once and kept) beside "prompt" (the '
                   "question over it)", "context")
    context = body["context"]
    if isinstance(prompt, str) and isinstance(context, str):
        out.update(context=context, query=prompt)
    elif isinstance(prompt, list) and isinstance(context, list):
        out.update(context_ids=context, query_ids=prompt)
    else:
        raise _bad("prompt and context must both be strings, or both lists of token ids", "prompt")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        out["logprobs"] = logprobs
    return out


def _content(message: Any, i: int) -> Tuple[str, str]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise _bad(f"messages[{i}] must be an object with a role and a content", "messages")
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise _bad(f"messages[{i}].content: only text parts are supported", "messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise _bad(f"messages[{i}].content must be a string", "messages")
    return message["role"], content


def chat_request(body: Dict[str, Any], model: str, tokenizer: Tokenizer) -> Dict[str, Any]:
    """``POST /v1/chat/completions`` -> the fields of a ``generate`` request: the last message (a user's) is the
    query, the turns before it in the chat template are the context."""
    out = _common(body, CHAT_FIELDS, model)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    turns = [dict(zip(("role", "content"), _content(m, i))) for i, m in enumerate(messages)]
    if turns[-1]["role"] != "user":
        raise _bad(f"the last message must be the user's question (got role {turns[-1]['role']!r})", "messages")
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs not in (None, True, False):
        raise _bad("logprobs must be true or false", "logprobs")
    if top is not None and not logprobs:
        raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
    if logprobs:  # the chosen tokens' log-probs need N >= 1 here; a bad top_logprobs is refused as generate's is
        out["logprobs"] = 1 if top is None or top == 0 and not isinstance(top, bool) else top
    try:
        context_ids, query_ids = tokenizer.encode_messages(turns)
    except RequestError as e:
        raise request_error(e) from None
    out.update(context_ids=context_ids, query_ids=query_ids)
    return out


class Answer:
    """One request's answer as OpenAI's JSON, built from its tokens as they come (``kind``: "completion" or
    "chat"). The text is decoded with the checkpoint's tokenizer (empty where it has none) and cut before the
    first stop string; a stream holds back what could still turn out to be the start of one."""

    def __init__(self, kind: str, rid: str, model: str, req: Request, tokenizer: Optional[Tokenizer],
                 top_logprobs: int) -> None:
        self.kind, self.rid, self.model, self.req, self.tokenizer = kind, rid, model, req, tokenizer
        self.top = top_logprobs
        self.created = int(time.time())
        self.sent = ""  # text streamed so far
        self.streamed = 0  # tokens streamed so far

    def _text(self, ids: List[int], final: bool) -> str:
        if self.tokenizer is None:
            return ""
        if final:
            return answer_text(self.tokenizer, ids, self.req)
        text = self.tokenizer.decode(ids)
        cut = min((i for i in (text.find(s) for s in self.req.stop) if i >= 0), default=-1)
        if cut >= 0:
            return text[:cut]
        hold = max((len(s) for s in self.req.stop), default=1) - 1
        text = text[: len(text) - hold]
        return text.rstrip("\ufffd")  # a character whose bytes are not all decoded yet

    def _token(self, t: int) -> str:
        return self.tokenizer.decode([t]) if self.tokenizer is not None else ""

    def _logprobs(self, entries: List[Dict[str, Any]], offset: int) -> Dict[str, Any]:
        if self.kind == "chat":
            def one(t, lp):
                s = self._token(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [dict(one(e["id"], e["logprob"]), top_logprobs=[one(t, lp) for t, lp in
                                                                                e["top"][: self.top]])
                                for e in entries]}
        tokens = [self._token(e["id"]) for e in entries]
        offsets = []
        for s in tokens:
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{self._token(t): lp for t, lp in e["top"][: self.top]} for e in entries],
                "text_offset": offsets}

    def _choice(self, text: str, finish: Optional[str], ids: List[int], entries, stream: bool) -> Dict[str, Any]:
        c: Dict[str, Any] = {"index": 0}
        if self.kind == "chat":
            c["delta" if stream else "message"] = ({"content": text} if stream else
                                                   {"role": "assistant", "content": text})
        else:
            c["text"] = text
            c["token_ids"] = ids  # an extension: the generated token ids (what ``generate`` writes)
        c["logprobs"] = None if entries is None else self._logprobs(entries, len(self.sent))
        c["finish_reason"] = finish
        return c

    def _envelope(self, choices: List[Dict[str, Any]], stream: bool) -> Dict[str, Any]:
        obj = {"chat": "chat.completion", "completion": "text_completion"}[self.kind]
        if stream and self.kind == "chat":
            obj += ".chunk"
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def usage(self, result: Dict[str, Any]) -> Dict[str, Any]:
        prompt = len(self.req.context_ids) + len(self.req.query_ids)
        n = len(result["generated_ids"])
        return {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n,
                "context_tokens": len(self.req.context_ids), "context_reused": result["context_reused"]}

    def whole(self, result: Dict[str, Any]) -> Dict[str, Any]:
        """The response to a request without ``stream``: ``result`` is the loop's (generated ids, finish
        reason, log-probs, context reuse)."""
        ids = result["generated_ids"]
        out = self._envelope([self._choice(self._text(ids, True), finish_reason(result), ids, result["logprobs"],
                                           False)], False)
        out["usage"] = self.usage(result)
        return out

    def first_chunk(self) -> Optional[Dict[str, Any]]:
        """A chat stream starts with the assistant's role."""
        if self.kind != "chat":
            return None
        return self._envelope([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}], True)

    def chunk(self, ids: List[int], entries: Optional[List[Dict[str, Any]]],
              result: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
        """The next chunk of a stream, given every token so far and their log-prob entries (None: not asked for;
        ``result``: the request ended with the last token); None while there is nothing new to send."""
        text = self._text(ids, result is not None)
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        new_ids = ids[self.streamed:]
        entries = None if entries is None else entries[self.streamed:]
        if not delta and not new_ids and result is None:
            return None
        if delta == "" and result is None and self.tokenizer is not None and not entries:
            return None  # tokens whose text is held back: they go out with the next piece
        choice = self._choice(delta, None if result is None else finish_reason(result), new_ids, entries, True)
        self.sent += delta
        self.streamed = len(ids)
        return self._envelope([choice], True)

    def usage_chunk(self, result: Dict[str, Any]) -> Dict[str, Any]:
        """A stream's last event before ``[DONE]`` where ``stream_options.include_usage`` asks for it."""
        return dict(self._envelope([], True), usage=self.usage(result))


def finish_reason(result: Dict[str, Any]) -> str:
    """OpenAI's finish reason: the model's end of sequence and a stop token or string are ``stop``."""
    return "length" if result["finish_reason"] == "length" else "stop"
