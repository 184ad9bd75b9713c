"""The request bodies the server takes, as pydantic models (OpenAI's fields, llama.cpp's extras).

Types and ranges that do not depend on the model are checked here; what does (token ids, the
vocabulary, the configured limits) is checked in `requests.py` before the request reaches a
session.  Unknown fields are ignored, as llama-server and llama-cpp-python's server do.  (Optional and
Union, not `X | Y`: pydantic evaluates the annotations at run time, also on Python 3.9.)
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["CHAT_ONLY", "COMPLETION_ONLY", "SAMPLING", "ChatRequest", "CompletionRequest", "EmbeddingRequest"]

INT32 = 2**31 - 1
Count = Annotated[int, Field(ge=0, le=INT32)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
Text = Annotated[str, Field(max_length=256)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Body):
    url: str
    detail: Optional[str] = None


class TextContent(_Body):
    type: Literal["text"]
    text: str


class ImageContent(_Body):
    type: Literal["image_url"]
    image_url: Union[ImageURL, str]


Content = Annotated[Union[TextContent, ImageContent], Field(discriminator="type")]


class Message(BaseModel):
    """A chat message; fields beyond role and content reach the chat template as they are."""

    model_config = ConfigDict(extra="allow")

    role: Annotated[str, Field(min_length=1, max_length=64)]
    content: Union[str, list[Content], None] = None


class _Sampling(_Body):
    """Fields both completion endpoints take."""

    model: Optional[Text] = None
    max_tokens: Optional[Count] = None
    temperature: Optional[Finite] = None
    top_p: Optional[Finite] = None
    top_k: Optional[Count] = None
    min_p: Optional[Finite] = None
    typical_p: Optional[Finite] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[Seed] = None
    presence_penalty: Optional[Finite] = None
    frequency_penalty: Optional[Finite] = None
    repeat_penalty: Optional[Finite] = None
    mirostat_mode: Optional[Literal[0, 1, 2]] = None
    mirostat_tau: Optional[Finite] = None
    mirostat_eta: Optional[Finite] = None
    logit_bias: Optional[dict[str, Finite]] = None
    grammar: Optional[str] = None
    stream: bool = False
    n: Optional[Literal[1]] = None
    user: Optional[Text] = None


class ChatRequest(_Sampling):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}]
        }
    )

    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Optional[Count] = None
    response_format: Optional[dict[str, Any]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[Count] = None
    tools: Optional[list[Any]] = None
    tool_choice: Any = None
    functions: Optional[list[Any]] = None
    function_call: Any = None


class CompletionRequest(_Sampling):
    model_config = ConfigDict(json_schema_extra={"examples": [{"prompt": "The sea is", "max_tokens": 8}]})

    prompt: Union[str, Annotated[list[Count], Field(min_length=1)]]
    logprobs: Optional[Count] = None
    echo: bool = False
    suffix: Optional[str] = None


NonEmpty = Annotated[str, Field(min_length=1)]


class EmbeddingRequest(_Body):
    model_config = ConfigDict(json_schema_extra={"examples": [{"input": ["a red apple", "the sea"]}]})

    input: Union[NonEmpty, Annotated[list[NonEmpty], Field(min_length=1)]]
    model: Optional[Text] = None
    encoding_format: Literal["float", "base64"] | None = None
    user: Optional[Text] = None


# fields passed on to create_completion / create_chat_completion as they are
SAMPLING = (
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "typical_p", "stop", "seed", "presence_penalty",
    "frequency_penalty", "repeat_penalty", "mirostat_mode", "mirostat_tau", "mirostat_eta", "logit_bias",
    "grammar",
)  # fmt: skip
CHAT_ONLY = (
    "response_format", "logprobs", "top_logprobs", "tools", "functions", "tool_choice", "function_call",
)  # fmt: skip
COMPLETION_ONLY = ("logprobs", "echo", "suffix")
