"""From a parsed request to what it will produce: vLLM's checks (model, context length,
sampling parameters), prompt token counts and the outputs. Pure: no I/O, no clock."""

from __future__ import annotations

import time
from typing import Any

from agent.simulator.config import SimulatorConfig
from agent.simulator.continuation import Keys, chat_choices, completion_choices, fresh_choices
from agent.simulator.generation import (
    ChoiceOutput,
    Sampling,
    TextModel,
    base_key,
    chat_text,
    embedding_key,
    embedding_vector,
    relevance_score,
)
from agent.simulator.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ResponsesRequest,
    TokenizeRequest,
    bad_request,
    check_chat_logprobs,
    check_completion_logprobs,
    check_continuation,
    check_logprobs_limit,
    generation_prompt,
    model_not_found,
    validation_error_of,
)
from agent.simulator.responses import Generation
from agent.simulator.responses_api import Messages, ResponsesMeta, StoredResponse
from agent.simulator.tokenizer import (
    Vocabulary,
    chat_prompt_tokens,
    count_tokens,
    text_prompt_tokens,
    token_strs,
)

EMBEDDING_CACHE = 4096


class Prepare:
    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.text = TextModel()
        self.vocab = Vocabulary()
        self._embeddings: dict[str, list[float]] = {}

    # ------------------------------------------------------------------ checks

    def check_model(self, model: str | None) -> None:
        if model and model != self.config.model:  # no model given: the served one, as vLLM
            raise model_not_found(model)

    def check_context(self, prompt_tokens: int, max_tokens: int | None, param: str) -> int:
        """vLLM's renderer checks (TokenizeParams); returns the max_tokens to generate: the
        rest of the context when none is given, as vLLM does."""
        limit = self.config.max_model_len
        out = max_tokens or 0
        if out > limit:
            # Sic: vLLM's message lacks the space and repeats the name.
            raise bad_request(f"{param}={out}cannot be greater than max_model_len="
                              f"max_total_tokens={limit}. Please request fewer output tokens.",
                              param, out)
        if prompt_tokens > limit - out:
            raise bad_request(
                f"You passed {prompt_tokens} input tokens and requested {out} output tokens. "
                f"However, the model's context length is only {limit} tokens, resulting in a "
                f"maximum input length of {limit - out} tokens. Please reduce the length of "
                "the input prompt.", "input_tokens", prompt_tokens)
        return limit - prompt_tokens if max_tokens is None else max_tokens

    @staticmethod
    def check_sampling(n: int, max_tokens: int, temperature: float | None,
                       min_tokens: int) -> None:
        """vLLM's SamplingParams checks: plain ValueErrors there, so no param."""
        problem = None
        if n < 1:
            problem = f"n must be at least 1, got {n}."
        elif max_tokens < 1:
            problem = f"max_tokens must be at least 1, got {max_tokens}."
        elif temperature is not None and temperature < 0:
            problem = f"temperature must be non-negative, got {temperature}."
        elif min_tokens < 0:
            problem = f"min_tokens must be greater than or equal to 0, got {min_tokens}."
        elif min_tokens > max_tokens:
            problem = (f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
                       f"got {min_tokens}.")
        if problem:
            raise ApiError(400, problem, "BadRequestError")

    # ------------------------------------------------------------------ generations

    def chat(self, req: ChatCompletionRequest, request_id: str) -> Generation:
        self.check_model(req.model)
        messages = [(m.role, m.text()) for m in req.messages]
        check_continuation(req, len(messages))
        prompt_tokens = chat_prompt_tokens((c for _, c in messages),
                                           add_generation_prompt=generation_prompt(req),
                                           continue_final_message=req.continue_final_message)
        if req.max_completion_tokens is not None:
            max_tokens = self.check_context(prompt_tokens, req.max_completion_tokens,
                                            "max_completion_tokens")
        else:
            max_tokens = self.check_context(prompt_tokens, req.max_tokens, "max_tokens")
        n = 1 if req.n is None else req.n
        self.check_sampling(n, max_tokens, req.temperature, req.min_tokens)
        logprobs = check_chat_logprobs(req)
        if req.continue_final_message:  # the final message left open: the model goes on
            choices = chat_choices(self.text, self._keys(req, n), messages,
                                   self._sampling(max_tokens, req))
        else:
            choices = self._choices(chat_text(messages), n, max_tokens, req)
        gen = self._generation(True, req, request_id, choices, [prompt_tokens] * n,
                               prompt_tokens, None)
        gen.logprobs = logprobs
        return gen

    def completion(self, req: CompletionRequest, request_id: str) -> Generation:
        self.check_model(req.model)
        logprobs = check_completion_logprobs(req)
        n = 1 if req.n is None else req.n
        choices: list[ChoiceOutput] = []
        per_choice: list[int] = []
        echo: list[str] = []
        total = 0
        for key_text, prompt_tokens, text in completion_prompts(req.prompt):
            max_tokens = self.check_context(prompt_tokens, req.max_tokens, "max_tokens")
            self.check_sampling(n, max_tokens, req.temperature, req.min_tokens)
            if isinstance(req.prompt, str):  # may hold a generation to go on with
                choices.extend(completion_choices(self.text, self._keys(req, n), req.prompt,
                                                  self._sampling(max_tokens, req)))
            else:
                choices.extend(self._choices(key_text, n, max_tokens, req))
            per_choice.extend([prompt_tokens] * n)
            echo.extend([text] * n)
            total += prompt_tokens
        gen = self._generation(False, req, request_id, choices, per_choice, total,
                               echo if req.echo else None)
        gen.logprobs = logprobs
        return gen

    def responses(self, req: ResponsesRequest, previous: StoredResponse | None,
                  response_id: str, message_id: str) -> Generation:
        """A Responses API request as vLLM prepares it (after the model check and the
        previous_response_id lookup): a chat over the instructions, the previous turn and
        the input."""
        if req.tools:
            # vLLM's NotImplementedError, answered with its __cause__ appended.
            raise ApiError(400, "Tool use is not supported in Responses API without Harmony "
                           "None", "BadRequestError")
        messages = response_messages(req, previous)
        prompt_tokens = chat_prompt_tokens(c for _, c in messages)
        limit = self.config.max_model_len
        if prompt_tokens >= limit:
            raise ApiError(400, f"The engine prompt length {prompt_tokens} exceeds the "
                           f"max_model_len {limit}. Please reduce prompt.",
                           "invalid_request_error")
        # Clamped to the context, not refused: vLLM's ResponsesRequest.to_sampling_params.
        rest = limit - prompt_tokens
        max_tokens = rest if req.max_output_tokens is None else min(req.max_output_tokens,
                                                                   rest)
        temperature = 1.0 if req.temperature is None else req.temperature
        self.check_sampling(1, max_tokens, temperature, 0)
        top = check_logprobs_limit(req.top_logprobs or 0) if req.include_logprobs() else None
        key, _ = base_key(server_seed=self.config.seed, prompt=chat_text(messages), seed=None,
                          temperature=req.temperature)
        choice = self.text.generate(key, Sampling(max_tokens))
        meta = ResponsesMeta(request=req, message_id=message_id, max_output_tokens=max_tokens,
                             temperature=temperature,
                             top_p=1.0 if req.top_p is None else req.top_p, top_logprobs=top,
                             messages=messages)
        return Generation(chat=True, id=response_id, created=int(time.time()),
                          model=self.config.model, choices=[choice],
                          prompt_tokens=[prompt_tokens], total_prompt_tokens=prompt_tokens,
                          stream=bool(req.stream), logprobs=top, responses=meta)

    def _choices(self, prompt: str, n: int, max_tokens: int,
                 req: ChatCompletionRequest | CompletionRequest) -> list[ChoiceOutput]:
        return fresh_choices(self.text, self._keys(req, n), prompt,
                             self._sampling(max_tokens, req))

    def _keys(self, req: ChatCompletionRequest | CompletionRequest, n: int) -> Keys:
        return Keys(self.config.seed, req.seed, req.temperature, n)

    @staticmethod
    def _sampling(max_tokens: int, req: ChatCompletionRequest | CompletionRequest
                  ) -> Sampling:
        return Sampling(max_tokens, req.stops(), req.include_stop_str_in_output,
                        req.ignore_eos, req.min_tokens)

    def _generation(self, chat: bool, req: ChatCompletionRequest | CompletionRequest,
                    request_id: str, choices: list[ChoiceOutput], per_choice: list[int],
                    total: int, echo: list[str] | None) -> Generation:
        stream = bool(req.stream)
        include_usage = continuous = False
        if stream and req.stream_options is not None:
            include_usage = bool(req.stream_options.include_usage)
            continuous = include_usage and bool(req.stream_options.continuous_usage_stats)
        return Generation(chat=chat, id=request_id, created=int(time.time()),
                          model=self.config.model, choices=choices, prompt_tokens=per_choice,
                          total_prompt_tokens=total, stream=stream, include_usage=include_usage,
                          continuous_usage=continuous, echo=echo)

    # ------------------------------------------------------------------ embeddings

    def embeddings(self, req: EmbeddingRequest) -> tuple[list[list[float]], int]:
        """The vectors, and the prompt tokens of all inputs."""
        self.check_model(req.model)
        if req.encoding_format not in ("float", "base64"):
            raise validation_error_of("literal_error", ("body", "encoding_format"),
                                      "Input should be 'float' or 'base64'")
        if req.dimensions is not None and req.dimensions != self.config.embedding_dimensions:
            raise bad_request("Model does not support matryoshka representation, changing "
                              "output dimensions will lead to poor results.")
        inputs = token_inputs(req.input, "input")
        for _, tokens, _ in inputs:
            self.check_context(tokens, None, "max_tokens")
        return [self._vector(key) for key, _, _ in inputs], sum(t for _, t, _ in inputs)

    # ------------------------------------------------------------------ score, rerank

    def scores(self, text_1: str | list[str], text_2: str | list[str]
               ) -> tuple[list[float], int]:
        """A cross-encoder's score per pair, 1:1, 1:N or N:N as vLLM pairs them, and the
        prompt tokens of all pairs (each BOS + query + separator + document + end)."""
        first = [text_1] if isinstance(text_1, str) else list(text_1)
        second = [text_2] if isinstance(text_2, str) else list(text_2)
        if len(first) > 1 and len(first) != len(second):
            raise ApiError(400, "Input lengths must be either 1:1, 1:N or N:N",
                           "BadRequestError")
        if not first:
            raise ApiError(400, "At least one text element must be given", "BadRequestError")
        if not second:
            raise ApiError(400, "At least one text_pair element must be given",
                           "BadRequestError")
        if len(first) == 1:
            first = first * len(second)
        scores = []
        total = 0
        for query, document in zip(first, second, strict=True):
            tokens = text_prompt_tokens(query) + count_tokens(document) + 2
            self.check_context(tokens, None, "max_tokens")
            total += tokens
            scores.append(relevance_score(self.config.seed, query, document))
        return scores, total

    # ------------------------------------------------------------------ tokenizer

    def tokenize(self, req: TokenizeRequest) -> dict[str, object]:
        self.check_model(req.model)
        if req.messages is not None:
            check_continuation(req, len(req.messages))
            tokens = self.vocab.chat_prompt(((m.role, m.text()) for m in req.messages),
                                            add_generation_prompt=generation_prompt(req),
                                            continue_final_message=req.continue_final_message)
        elif req.add_special_tokens is False:
            tokens = self.vocab.encode(req.prompt or "")
        else:
            tokens = self.vocab.text_prompt(req.prompt or "")
        return {"count": len(tokens), "max_model_len": self.config.max_model_len,
                "tokens": [i for i, _ in tokens],
                "token_strs": token_strs(tokens) if req.return_token_strs else None}

    def detokenize(self, req: DetokenizeRequest) -> dict[str, object]:
        self.check_model(req.model)
        return {"prompt": self.vocab.decode(req.tokens)}

    def _vector(self, text: str) -> list[float]:
        cached = self._embeddings.get(text)
        if cached is None:
            if len(self._embeddings) >= EMBEDDING_CACHE:
                self._embeddings.clear()  # cheaper than LRU bookkeeping on the hot path
            cached = embedding_vector(embedding_key(self.config.seed, text),
                                      self.config.embedding_dimensions)
            self._embeddings[text] = cached
        return cached


def response_messages(req: ResponsesRequest, previous: StoredResponse | None) -> Messages:
    """vLLM's `_construct_input_messages`: the new instructions, the previous response's
    messages and output, then the input. Input items without a role (tool outputs and the
    like) give the stand-in model nothing to read."""
    messages: list[tuple[str, str]] = []
    if req.instructions:
        messages.append(("system", req.instructions))
    if previous is not None:
        messages.extend(previous.messages)
        messages.append(("assistant", previous.output_text))
    if isinstance(req.input, str):
        messages.append(("user", req.input))
    else:
        messages.extend((item.role, item.text()) for item in req.input if item.role)
    return tuple(messages)


def completion_prompts(prompt: str | list[Any] | None) -> list[tuple[str, int, str]]:
    if prompt is None or (isinstance(prompt, list) and not prompt):
        raise bad_request("Either prompt or prompt_embeds must be provided and non-empty.")
    return token_inputs(prompt, "prompt")


def token_inputs(value: str | list[Any], field: str) -> list[tuple[str, int, str]]:
    """Each prompt as (text keying its output, prompt tokens, text to echo): a string, a list
    of strings, a list of token ids, or a list of lists of token ids."""
    if isinstance(value, str):
        return [(value, text_prompt_tokens(value), value)]
    if all(isinstance(v, str) for v in value):
        return [(v, text_prompt_tokens(v), v) for v in value]
    if value and all(_is_id(v) for v in value):
        return [(_ids_text(value), len(value), "")]
    if all(isinstance(v, list) and v and all(_is_id(i) for i in v) for v in value):
        return [(_ids_text(v), len(v), "") for v in value]
    raise validation_error_of("value_error", ("body", field),
                              "Input should be a valid string, a list of strings, a list of "
                              "token ids or a list of lists of token ids")


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _ids_text(ids: list[Any]) -> str:
    return "\x1d".join(str(i) for i in ids)
