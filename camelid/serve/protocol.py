"""The request and response bodies of the HTTP API, as pydantic models: OpenAI's completions, chat completions,
models and errors (the fields the official client sends), plus our chat sessions.

Unknown request fields are ignored, as OpenAI-compatible servers do, so a newer client still works. Range checks
live here (pydantic turns them into a 400 naming the field); SamplingParams checks the rest again.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


def _not_unicode(value: Any) -> bool:
    """A string (or list of them) holding a lone UTF-16 surrogate: JSON allows "\\ud800", but no tokenizer or
    database takes it."""
    if isinstance(value, list):
        return any(_not_unicode(v) for v in value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
    return False


def _leaf_types(annotation: Any) -> set:
    args = get_args(annotation)
    return set().union(*map(_leaf_types, args)) if args else {annotation}


def _has_bool(value: Any) -> bool:
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, bool) or isinstance(value, list) and any(map(_has_bool, value))


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # NaN passed every range check

    @field_validator("*")
    @classmethod
    def _unicode_only(cls, value: Any) -> Any:
        if _not_unicode(value):
            raise ValueError("holds a lone UTF-16 surrogate, which is not valid Unicode text")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1 and "0.5" as 0.5; in OpenAI's schema neither is a number
        leaves = _leaf_types(cls.model_fields[info.field_name].annotation)
        if bool not in leaves and leaves & {int, float} and _has_bool(value):
            raise ValueError("must be a number, not a boolean")
        if leaves & {int, float} and leaves <= {int, float, type(None)} and isinstance(value, str):
            raise ValueError("must be a number, not a string")
        return value


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """Fields shared by completions and chat completions."""

    model: str
    n: int = Field(1, ge=1, le=32)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's range
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # vLLM extensions: top_k, min_p, repetition_penalty
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # token id (a JSON key: a string) -> bias in [-100, 100]

    @field_validator("stop")
    @classmethod
    def _four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError(f"up to 4 stop sequences, got {len(value)}")  # OpenAI's limit
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")  # as OpenAI answers
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        bad = next((k for k in value or {} if not (k.isascii() and k.isdigit())), None)
        if bad is not None:
            raise ValueError(f"keys must be token ids (integers >= 0), got {bad!r}")
        bad = next((v for v in (value or {}).values() if not -100 <= v <= 100), None)
        if bad is not None:
            raise ValueError(f"biases must be in [-100, 100], got {bad!r}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, values: Any) -> Any:
        # OpenAI's parameters are nullable, and the openai client sends an explicit None as null
        return {k: v for k, v in values.items() if v is not None} if isinstance(values, dict) else values

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self) -> tuple[str, str] | None:
        """(field, feature) of the first field that asks for a feature this server lacks, else None. Those fields
        are declared so that such a request is refused (400) instead of answered as if they were not there."""
        return None


# the features behind OpenAI fields that this server does not have
FUNCTION_CALLING = "function calling (tools)"


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1, le=32)  # candidates to generate; the n most likely are returned
    suffix: str | None = None  # refused: no fill-in-the-middle

    def unsupported(self) -> tuple[str, str] | None:
        return ("suffix", "fill-in-the-middle (suffix)") if self.suffix else None


class ContentPart(_Request):
    type: str
    text: str | None = None  # a part of type "text"
    refusal: str | None = None  # a part of type "refusal" (assistant messages)


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "tool", "function", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list | None = None  # function calling: refused (ChatCompletionRequest.unsupported)
    function_call: Any = None

    @model_validator(mode="after")
    def _text_only(self) -> ChatMessage:
        # an image or audio part would be dropped unread: refused, not answered as if it were not there
        readable = ("text", "refusal") if self.role == "assistant" else ("text",)  # only an assistant refuses
        other = next((p.type for p in self.content if p.type not in readable), None) \
            if isinstance(self.content, list) else None
        if other is not None:
            raise ValueError(f"content parts of type {other!r} are not supported in a {self.role} message: "
                             f"this server reads {' and '.join(readable)} parts")
        return self

    def uses_functions(self) -> bool:
        return self.role in ("tool", "function") or bool(self.tool_calls) or self.function_call is not None

    def text(self) -> str:
        """The content as one string (the text of its parts joined; an assistant's refusal is what it said)."""
        if isinstance(self.content, list):
            return "".join((p.text if p.type == "text" else p.refusal) or "" for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: up to the context length
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)  # alternatives per token; needs logprobs: true
    session_id: str | None = None  # ours: run this turn inside a stored chat session
    # features this server lacks: a request that asks for one is refused (unsupported)
    tools: list | None = None
    functions: list | None = None
    tool_choice: Any = None
    function_call: Any = None
    response_format: dict | None = None
    audio: dict | None = None
    modalities: list[str] | None = None
    web_search_options: dict | None = None
    best_of: int | None = Field(None, ge=1)  # a completions parameter (vLLM also took it on chat)

    def unsupported(self) -> tuple[str, str] | None:
        used = [("tools", bool(self.tools), FUNCTION_CALLING),
                ("functions", bool(self.functions), FUNCTION_CALLING),
                ("tool_choice", self.tool_choice not in (None, "none", "auto"), FUNCTION_CALLING),
                ("function_call", self.function_call not in (None, "none", "auto"), FUNCTION_CALLING),
                ("response_format", (self.response_format or {}).get("type", "text") != "text",
                 "structured output (response_format json_object / json_schema)"),
                ("audio", self.audio is not None, "audio output"),
                ("modalities", any(m != "text" for m in self.modalities or []), "audio output"),
                ("web_search_options", self.web_search_options is not None, "web search"),
                ("messages", any(m.uses_functions() for m in self.messages),
                 f"{FUNCTION_CALLING}: tool or function messages and tool calls"),
                ("best_of", (self.best_of or 1) > 1, "best_of on chat completions (only on completions)")]
        return next(((name, feature) for name, on, feature in used if on), None)


# ---- responses ------------------------------------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: Any = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: Any = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    session_id: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "camelid"
    context_length: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---- chat sessions --------------------------------------------------------------------------------------------------

class _SessionRequest(_Request):
    model_config = ConfigDict(extra="forbid")  # our own API, no client sends extras: a misspelt field is refused


class SessionCreate(_SessionRequest):
    title: str | None = Field(None, max_length=500)
    model: str | None = None
    system_prompt: str | None = None


class SessionUpdate(_SessionRequest):
    title: str | None = Field(None, max_length=500)
    model: str | None = None
    system_prompt: str | None = None


class SessionMessage(BaseModel):
    role: str
    content: str
    created_at: float  # unix seconds


class Session(BaseModel):
    id: str
    title: str
    model: str | None
    system_prompt: str | None
    created_at: float  # unix seconds
    updated_at: float


class SessionWithMessages(Session):
    messages: list[SessionMessage]


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Session]


class SessionDeleted(BaseModel):
    id: str
    deleted: bool = True
