"""OpenAI request schemas (msgspec) and how a decode failure becomes a 400 naming the field.

Decoding and validation are one step (``msgspec.json.decode`` into these structs); bounds
are declared with ``Meta`` so the error names the field and the bound. Unknown fields are
ignored, as OpenAI-compatible servers do for vendor extensions.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from baton.errors import InvalidRequestError

PositiveInt = Annotated[int, Meta(ge=1)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
StopList = Annotated[list[str], Meta(max_length=4)]
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class JsonSchemaFormat(msgspec.Struct):
    name: str = "response"
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(msgspec.Struct):
    type: str = "text"
    json_schema: JsonSchemaFormat | None = None


class RouterOverrideFields(msgspec.Struct, forbid_unknown_fields=True):
    """Per-request overrides of the KV router's weights (Dynamo's router_config_override)."""

    overlap_score_credit: Annotated[float, Meta(ge=0.0)] | None = None
    prefill_load_scale: Annotated[float, Meta(ge=0.0)] | None = None
    temperature: Annotated[float, Meta(ge=0.0)] | None = None
    assume_kv_reuse: bool | None = None
    track_prefill_tokens: bool | None = None
    decode_active_request_weight: Annotated[float, Meta(ge=0.0)] | None = None


class BatonExtension(msgspec.Struct):
    """The ``baton`` object a request may carry (vendor extension, like Dynamo's ``nvext``)."""

    router_config_override: RouterOverrideFields | None = None
    worker_id: int | None = None
    """Pin the request to this worker (Dynamo's backend_instance_id)."""


class _SamplingFields(msgspec.Struct, kw_only=True):
    """Fields shared by chat and legacy completions."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: int | None = None
    stop: str | StopList | None = None
    n: PositiveInt | None = None
    user: str | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=2.0)] | None = None
    top_k: Annotated[int, Meta(ge=-1)] | None = None
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    ignore_eos: bool = False
    min_tokens: NonNegativeInt = 0
    baton: BatonExtension | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: str | list[Any]
    max_tokens: PositiveInt = 16
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: PositiveInt | None = None


class BusyThresholdUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /busy_threshold``: fields left out keep their value; null disables a check."""

    active_decode_blocks_threshold: (
        Annotated[float, Meta(ge=0.0, le=1.0)] | None | msgspec.UnsetType
    ) = msgspec.UNSET
    active_prefill_tokens_threshold: NonNegativeInt | None | msgspec.UnsetType = msgspec.UNSET


_AT = re.compile(r" - at `\$\.?([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]+)`")


def validation_error(exc: msgspec.ValidationError) -> InvalidRequestError:
    """Turns msgspec's message ("Expected `int` >= 1 - at `$.max_tokens`") into a 400
    whose ``param`` is the offending field (``messages[0].role``)."""
    message = str(exc)
    at = _AT.search(message)
    path = at.group(1) if at else ""
    missing = _MISSING.search(message)
    if missing:
        path = f"{path}.{missing.group(1)}" if path else missing.group(1)
    text = _AT.sub("", message)
    return InvalidRequestError(f"{path}: {text}" if path else text, param=path or None)


def decode_request(body: bytes, kind: type[msgspec.Struct]) -> Any:
    if not body.strip():
        raise InvalidRequestError("the request body is empty; expected a JSON object")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise validation_error(exc) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"malformed JSON in request body: {exc}") from None
    except RecursionError:
        raise InvalidRequestError("the request body's JSON is nested too deeply") from None
