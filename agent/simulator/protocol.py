"""Requests as vLLM's OpenAI server accepts them, and its error bodies.

Error bodies have current vLLM's shape (0.10.1 on): ``{"error": {"message": str, "type": str,
"param": str | null, "code": int}}`` with ``code`` the HTTP status; not the flat
``{"object": "error", "message", ...}`` of earlier versions.

Requests decode with msgspec; unknown fields are accepted and ignored, as vLLM does (it logs
them). A body that is not JSON, or a field of the wrong type, gets what FastAPI's validation
handler in vLLM answers: 400, ``type`` "Bad Request", a "N validation error(s)" message and
``param`` the field's dotted path (``body.max_tokens``). Errors found after parsing use vLLM's
``create_error_response`` form: ``type`` "BadRequestError" / "NotFoundError" /
"InternalServerError" and the status as ``code``.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")


class ApiError(Exception):
    """Answered as ``{"error": {...}}`` with `status`."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.status, self.param)


def error_body(message: str, type_: str, code: int, param: str | None = None) -> bytes:
    return msgspec.json.encode({"error": {"message": message, "type": type_, "param": param,
                                          "code": code}})


def bad_request(message: str, param: str | None = None, value: Any = None) -> ApiError:
    """vLLM's VLLMValidationError as answered: its str() appends the parameter and value."""
    extras = []
    if param is not None:
        extras.append(f"parameter={param}")
    if value is not None:
        extras.append(f"value={value}")
    if extras:
        message = f"{message} ({', '.join(extras)})"
    return ApiError(400, message, "BadRequestError", param)


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")


ENGINE_FAILURE = ApiError(
    500, "EngineCore encountered an issue. See stack trace (above) for the root cause.",
    "InternalServerError")


# --------------------------------------------------------------------------- request shapes


class StreamOptions(msgspec.Struct, kw_only=True):
    # vLLM's default: stream_options without include_usage still means include it.
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        content = self.content
        if content is None or isinstance(content, str):
            return content or ""
        return "\n".join(p.text for p in content if p.type == "text" and p.text is not None)


class _Sampling(msgspec.Struct, kw_only=True):
    model: str | None = None
    n: int | None = 1
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    temperature: float | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    request_id: str | None = None
    cache_salt: Any = None
    """Checked by `check_cache_salt` (as vLLM's "before" validator, whatever the type)."""

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str | list[Any] | None = None
    max_tokens: int | None = 16
    echo: bool | None = False


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    input: str | list[Any]
    model: str | None = None
    encoding_format: str = "float"
    dimensions: int | None = None
    request_id: str | None = None
    cache_salt: Any = None


_CHAT = msgspec.json.Decoder(ChatCompletionRequest)
_COMPLETION = msgspec.json.Decoder(CompletionRequest)
_EMBEDDING = msgspec.json.Decoder(EmbeddingRequest)


def decode_chat(body: bytes) -> ChatCompletionRequest:
    return _decode(_CHAT, body)


def decode_completion(body: bytes) -> CompletionRequest:
    return _decode(_COMPLETION, body)


def decode_embedding(body: bytes) -> EmbeddingRequest:
    return _decode(_EMBEDDING, body)


def _decode(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise validation_error(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise validation_error_of("json_invalid", ("body", 0), "JSON decode error",
                                  {"error": str(exc)}) from None


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`$")
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def validation_error(msgspec_message: str) -> ApiError:
    """A msgspec validation message (``Expected `int`, got `str` - at `$.n` ``) as vLLM's
    FastAPI handler would word the pydantic error for the same field."""
    match = _AT.match(msgspec_message)
    what = match.group("what") if match else msgspec_message
    path = (match.group("path") if match else None) or ""
    loc: list[str | int] = ["body"]
    for name, index in _STEP.findall(path):
        loc.append(name if name else int(index))
    missing = _MISSING.match(what)
    if missing:
        loc.append(missing.group("field"))
        return validation_error_of("missing", tuple(loc), "Field required")
    return validation_error_of("value_error", tuple(loc), what)


def validation_error_of(kind: str, loc: tuple[str | int, ...], msg: str,
                        ctx: dict[str, str] | None = None) -> ApiError:
    dotted = ".".join(str(p) for p in loc)
    error: dict[str, Any] = {"type": kind, "loc": dotted, "msg": msg}
    if ctx:
        error["ctx"] = ctx
    return ApiError(400, f"1 validation error:\n  {error}", "Bad Request", dotted)


def model_validation_error(message: str, param: str) -> ApiError:
    """A VLLMValidationError raised by one of a request model's "before" validators, as
    vLLM's validation handler reports it: with its parameter, ``loc`` the whole body."""
    error = {"type": "value_error", "loc": "body",
             "msg": f"Value error, {message} (parameter={param})"}
    return ApiError(400, f"1 validation error:\n  {error}", "Bad Request", param)


def check_stream_options(req: _Sampling) -> None:
    if req.stream_options is not None and not req.stream:
        raise model_validation_error("Stream options can only be defined when `stream=True`.",
                                     "stream_options")


MAX_CACHE_SALT_LENGTH = 128
_CACHE_SALT_FORBIDDEN = frozenset("@/\\\x00")


def check_cache_salt(salt: object) -> None:
    """vLLM's `validate_cache_salt` (chat, completions and pooling requests): a non-empty
    string of at most 128 characters without '@', '/', '\\' or NUL."""
    if salt is None:
        return
    if not isinstance(salt, str) or not salt:
        raise model_validation_error(
            "Parameter 'cache_salt' must be a non-empty string if provided.", "cache_salt")
    if len(salt) > MAX_CACHE_SALT_LENGTH or not _CACHE_SALT_FORBIDDEN.isdisjoint(salt):
        raise model_validation_error(
            "Parameter 'cache_salt' must be at most 128 characters and must not contain "
            "'@', '/', '\\\\', or NUL.", "cache_salt")
