"""Request bodies of the OpenAI-compatible endpoints, with this server's limits (pydantic models).

:func:`openai_schemas` builds ``ChatCompletionRequest`` and ``CompletionRequest`` for one
:class:`~slimtune.serve.settings.ServeConfig`, so ``/docs`` shows the real limits and every
refusal names the field (``param`` in OpenAI's error shape). What they accept:

- both: ``model`` (required), ``max_tokens`` (1 .. ``--max-new-tokens``; chat also takes
  ``max_completion_tokens``), ``temperature`` (0 .. 2, default 1 as OpenAI's: 0 is greedy),
  ``top_p``, ``stop`` (a string or up to 4 of them), ``seed``, ``n`` (1 only), ``stream``,
  ``stream_options.include_usage``, ``user`` (ignored); ``presence_penalty`` /
  ``frequency_penalty`` only at 0, ``logit_bias`` only empty, no log-probabilities;
- chat: ``messages`` (roles system, developer (= system), user, assistant; content a string or
  text parts), rendered with the model's chat template;
- completions: ``prompt`` (a string, a list of strings, token ids, or lists of token ids; one
  choice per prompt), ``echo`` false, ``suffix`` none, ``best_of`` 1.

Any other field is refused (as OpenAI does), so a misspelt ``max_token`` never passes silently;
tools and function calling are not supported.

Top-level imports are stdlib only (pydantic is the serve extra).
"""

from typing import Annotated, Any, Literal

from slimtune.serve.settings import ServeConfig

ROLES = ("system", "developer", "user", "assistant")
MAX_STOPS = 4


def _check_field(name: str, value: Any, cfg: ServeConfig) -> Any:
    """The rules on one sampling field that its type cannot say (ValueError names the fix)."""
    if name == "n" and value != 1:
        raise ValueError(f"n={value}: this server returns one choice per prompt; send n=1 (or leave it out)")
    if name == "max_tokens" and value is not None and value > cfg.max_new_tokens:
        raise ValueError(f"max_tokens={value} is more than this server allows ({cfg.max_new_tokens}, "
                         "slimtune serve --max-new-tokens)")
    if name == "stop" and isinstance(value, list) and len(value) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop strings")
    if name in ("presence_penalty", "frequency_penalty") and value:
        raise ValueError("not supported by this server (send 0 or leave it out)")
    if name == "logit_bias" and value:
        raise ValueError("not supported by this server")
    return value


def openai_schemas(cfg: ServeConfig) -> tuple[type, type]:
    """``(ChatCompletionRequest, CompletionRequest)`` for this server's limits (module docstring).

    Long because it declares both request bodies, which share the limits in ``cfg``.
    """
    from pydantic import (  # optional dependency (the serve extra)
        BaseModel,
        ConfigDict,
        Field,
        StrictBool,
        StrictFloat,
        StrictInt,
        StringConstraints,
        ValidationInfo,
        field_validator,
        model_validator,
    )

    Number = StrictFloat | StrictInt
    Content = Annotated[str, StringConstraints(strict=True, max_length=cfg.max_chars)]
    Prompt = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=cfg.max_chars)]
    TokenIds = Annotated[list[Annotated[int, Field(strict=True, ge=0)]], Field(min_length=1, max_length=cfg.max_chars)]

    class StreamOptions(BaseModel):
        model_config = ConfigDict(extra="forbid")
        include_usage: StrictBool = False

    class Sampling(BaseModel):
        model_config = ConfigDict(extra="forbid")
        model: Annotated[str, StringConstraints(strict=True, min_length=1, max_length=256)]
        max_tokens: StrictInt | None = Field(None, ge=1, description=f"at most {cfg.max_new_tokens}")
        temperature: Number | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
        top_p: Number | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
        stop: Prompt | list[Prompt] | None = None
        seed: StrictInt | None = None
        n: StrictInt = 1
        stream: StrictBool | None = False
        stream_options: StreamOptions | None = None
        presence_penalty: Number | None = Field(None, ge=-2.0, le=2.0)
        frequency_penalty: Number | None = Field(None, ge=-2.0, le=2.0)
        logit_bias: dict[str, Number] | None = None
        user: str | None = None

        @field_validator("n", "max_tokens", "stop", "presence_penalty", "frequency_penalty", "logit_bias")
        @classmethod
        def _supported(cls, value: Any, info: ValidationInfo) -> Any:
            return _check_field(info.field_name, value, cfg)

        @model_validator(mode="after")
        def _stream_options(self) -> Any:
            if self.stream_options is not None and not self.stream:
                raise ValueError("stream_options is only allowed with stream: true")
            return self

    class TextPart(BaseModel):
        model_config = ConfigDict(extra="forbid")
        type: Literal["text"]
        text: Content

    class ChatMessage(BaseModel):
        model_config = ConfigDict(extra="forbid")
        role: Literal[ROLES]  # type: ignore[valid-type]
        content: Content | list[TextPart]
        name: str | None = None

    class ChatCompletionRequest(Sampling):
        """OpenAI's chat completion request (the subset this server runs; module docstring)."""

        messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
        max_completion_tokens: StrictInt | None = Field(None, ge=1)
        logprobs: Literal[False] | None = None
        top_logprobs: None = None
        response_format: dict[Literal["type"], Literal["text"]] | None = None

        @model_validator(mode="before")
        @classmethod
        def _one_budget(cls, data: Any) -> Any:
            if isinstance(data, dict) and data.get("max_completion_tokens") is not None:
                if data.get("max_tokens") not in (None, data["max_completion_tokens"]):
                    raise ValueError("give max_tokens or max_completion_tokens, not two different values")
                data = {**data, "max_tokens": data["max_completion_tokens"]}
            return data

    class CompletionRequest(Sampling):
        """OpenAI's (legacy) completion request: text continues each prompt."""

        prompt: Prompt | TokenIds | Annotated[list[Prompt], Field(min_length=1, max_length=cfg.max_texts)] \
            | Annotated[list[TokenIds], Field(min_length=1, max_length=cfg.max_texts)]
        echo: Literal[False] | None = None
        suffix: None = None
        best_of: Literal[1] | None = None
        logprobs: Literal[0] | None = None

    return ChatCompletionRequest, CompletionRequest


def message_dicts(messages: list[Any]) -> list[dict[str, str]]:
    """Validated chat messages as ``{"role", "content"}`` dicts for the chat template
    (text parts joined; ``developer`` is a system message)."""
    out = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def stop_list(stop: str | list[str] | None) -> list[str]:
    """``stop`` as a list of strings."""
    return [stop] if isinstance(stop, str) else list(stop or [])


__all__ = ["openai_schemas", "message_dicts", "stop_list"]
