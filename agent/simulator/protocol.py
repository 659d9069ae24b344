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
from typing import Any, Protocol, TypeVar

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


class _ChatTemplate(Protocol):
    add_generation_prompt: bool | msgspec.UnsetType
    continue_final_message: bool


def generation_prompt(req: _ChatTemplate) -> bool:
    """`add_generation_prompt`: true when not given (vLLM's default). Requests keep it unset
    then, as vLLM's checks tell the two apart (`check_generation_prompt`,
    `check_continuation`)."""
    return req.add_generation_prompt is not False


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: list[ChatMessage]
    add_generation_prompt: bool | msgspec.UnsetType = msgspec.UNSET
    continue_final_message: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = 0


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str | list[Any] | None = None
    max_tokens: int | None = 16
    echo: bool | None = False
    logprobs: int | None = None


class InputPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class InputItem(msgspec.Struct, kw_only=True):
    """A Responses API input item. Messages (``{"role", "content"}``, with or without
    ``"type": "message"``) are what the stand-in model reads; other items have no role."""

    type: str | None = None
    role: str | None = None
    content: str | list[InputPart] | None = None

    def text(self) -> str:
        content = self.content
        if content is None or isinstance(content, str):
            return content or ""
        return "\n".join(p.text for p in content
                         if p.type in ("input_text", "output_text", "text") and p.text)


class ResponsesRequest(msgspec.Struct, kw_only=True):
    """vLLM's ResponsesRequest: the fields it reads, with its defaults."""

    input: str | list[InputItem]
    model: str | None = None
    background: bool | None = False
    include: list[str] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = True
    previous_response_id: str | None = None
    prompt: Any = None
    reasoning: Any = None
    service_tier: str = "auto"
    store: bool | None = True
    stream: bool | None = False
    temperature: float | None = None
    text: Any = None
    tool_choice: Any = "auto"
    tools: list[Any] = msgspec.field(default_factory=list)
    top_logprobs: int | None = 0
    top_p: float | None = None
    truncation: str | None = "disabled"
    user: str | None = None
    request_id: str | None = None
    cache_salt: Any = None

    def include_logprobs(self) -> bool:
        return bool(self.include) and "message.output_text.logprobs" in (self.include or ())


class RerankRequest(msgspec.Struct, kw_only=True):
    query: str
    documents: list[str]
    model: str | None = None
    top_n: int = 0


class ScoreRequest(msgspec.Struct, kw_only=True):
    text_1: str | list[str]
    text_2: str | list[str]
    model: str | None = None


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """vLLM's TokenizeCompletionRequest or TokenizeChatRequest, told apart by their field."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | msgspec.UnsetType = msgspec.UNSET
    continue_final_message: bool = False
    return_token_strs: bool | None = False


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    tokens: list[int]
    model: str | None = None


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
_RESPONSES = msgspec.json.Decoder(ResponsesRequest)
_RERANK = msgspec.json.Decoder(RerankRequest)
_SCORE = msgspec.json.Decoder(ScoreRequest)
_TOKENIZE = msgspec.json.Decoder(TokenizeRequest)
_DETOKENIZE = msgspec.json.Decoder(DetokenizeRequest)


def decode_chat(body: bytes) -> ChatCompletionRequest:
    return _decode(_CHAT, body)


def decode_completion(body: bytes) -> CompletionRequest:
    return _decode(_COMPLETION, body)


def decode_embedding(body: bytes) -> EmbeddingRequest:
    return _decode(_EMBEDDING, body)


def decode_responses(body: bytes) -> ResponsesRequest:
    req = _decode(_RESPONSES, body)
    # vLLM's "before" validators, in its order.
    if req.background and req.store is False:
        raise model_validation_error("background can only be used when `store` is true",
                                     None)
    if req.prompt is not None:
        raise model_validation_error("prompt template is not supported", None)
    check_cache_salt(req.cache_salt)
    return req


def decode_rerank(body: bytes) -> RerankRequest:
    return _decode(_RERANK, body)


def decode_score(body: bytes) -> ScoreRequest:
    return _decode(_SCORE, body)


def decode_tokenize(body: bytes) -> TokenizeRequest:
    req = _decode(_TOKENIZE, body)
    if (req.prompt is None) == (req.messages is None):
        # Neither or both: pydantic matches no member of the union.
        raise validation_error_of("missing", ("body", "prompt"), "Field required")
    if req.messages is not None:
        check_generation_prompt(req)
    return req


def decode_detokenize(body: bytes) -> DetokenizeRequest:
    return _decode(_DETOKENIZE, body)


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


def model_validation_error(message: str, param: str | None) -> ApiError:
    """A VLLMValidationError raised by one of a request model's "before" validators, as
    vLLM's validation handler reports it: with its parameter, ``loc`` the whole body (a
    plain ValueError has no parameter)."""
    suffix = f" (parameter={param})" if param else ""
    error = {"type": "value_error", "loc": "body", "msg": f"Value error, {message}{suffix}"}
    return ApiError(400, f"1 validation error:\n  {error}", "Bad Request", param or "body")


def check_stream_options(req: _Sampling) -> None:
    if req.stream_options is not None and not req.stream:
        raise model_validation_error("Stream options can only be defined when `stream=True`.",
                                     "stream_options")


def check_generation_prompt(req: _ChatTemplate) -> None:
    """vLLM's "before" validator of chat (and chat tokenize) requests: both given true."""
    if req.continue_final_message and req.add_generation_prompt is True:
        raise model_validation_error("Cannot set both `continue_final_message` and "
                                     "`add_generation_prompt` to True.", None)


CONTINUE_WITH_GENERATION_PROMPT = (
    "continue_final_message and add_generation_prompt are not compatible. Use "
    "continue_final_message when you want the model to continue the final message, and "
    "add_generation_prompt when you want to add a header that will prompt it to start a new "
    "assistant message instead.")


def check_continuation(req: _ChatTemplate, messages: int) -> None:
    """What applying the chat template (transformers, under vLLM) refuses of a final message
    left open: `add_generation_prompt` not given, so true by default, which vLLM's validator
    lets by (it reads the body as sent); or no message to continue. vLLM answers the
    template's ValueError as a 400."""
    if not req.continue_final_message:
        return
    if generation_prompt(req):
        raise ApiError(400, CONTINUE_WITH_GENERATION_PROMPT, "BadRequestError")
    if not messages:
        raise ApiError(400, "list index out of range", "BadRequestError")


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


MAX_LOGPROBS = 20
"""vLLM's default `--max-logprobs`."""
VOCAB_SIZE = 128256
"""What a logprobs count of -1 means: the whole vocabulary (Llama 3's)."""


def check_chat_logprobs(req: ChatCompletionRequest) -> int | None:
    """vLLM's `check_logprobs` validator, then the engine's limit; the number of top
    logprobs per token, or None when no logprobs are asked for."""
    top = req.top_logprobs
    if top is not None:
        if top < 0 and top != -1:
            raise model_validation_error("`top_logprobs` must be a positive value or -1.",
                                         "top_logprobs")
        if (top == -1 or top > 0) and not req.logprobs:
            raise model_validation_error(
                "when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
    if not req.logprobs:
        return None
    return check_logprobs_limit(top or 0)


def check_completion_logprobs(req: CompletionRequest) -> int | None:
    if req.logprobs is not None and req.logprobs < 0 and req.logprobs != -1:
        raise model_validation_error("`logprobs` must be a positive value.", "logprobs")
    return None if req.logprobs is None else check_logprobs_limit(req.logprobs)


def check_logprobs_limit(count: int) -> int:
    """The engine's check (SamplingParams against --max-logprobs)."""
    wanted = VOCAB_SIZE if count == -1 else count
    if wanted > MAX_LOGPROBS:
        raise bad_request(f"Requested sample logprobs of {wanted}, which is greater than max "
                          f"allowed: {MAX_LOGPROBS}", "logprobs", wanted)
    return wanted
