"""The API's request and response models (pydantic): OpenAI's chat completions, plus IVT-LR's extension fields.

Extensions of a request (the `openai` client sends them with `extra_body={...}`):
  n_latent           latent reasoning steps (0: none, plain decoding; default: the server's --n-latent)
  k                  image embeddings each latent step selects (default: the server's --k)
  method             one of the evaluation CLI's methods (experiments.evaluate --help): ivtlr, no-cot, cot,
                     coconut, no-latent-text, no-latent
  return_selections  add `selections`: per latent step, the grid cells of the chosen image tokens
Extensions of a response: `usage.latent_steps`, `choices[i].token_ids` (the generated ids, EOS included) and
`selections`; a streamed response carries `token_ids` in each chunk and `selections` in its first chunk.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ivtlr_jax.eval.config import METHODS


class ImageURL(BaseModel):
    url: str = Field(description="data:image/png;base64,... or file:///path under the server's --allow-dir")
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """POST /v1/chat/completions. Fields OpenAI defines that this server does not use are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy (the default, as evaluation)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**32)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    # IVT-LR extensions
    n_latent: int | None = Field(None, ge=0)
    k: int | None = Field(None, ge=0)
    method: Literal[tuple(METHODS)] | None = None  # type: ignore[valid-type]
    return_selections: bool = False

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str
    token_ids: list[int]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    latent_steps: int = Field(description="latent reasoning steps run (each one forward step, like a token)")


class Cell(BaseModel):
    image: int  # which image of the request
    row: int  # grid cell of the image token in the image as the model sees it
    col: int
    token: int  # index among the request's image tokens


class ImageGrid(BaseModel):
    rows: int  # image-token grid
    cols: int
    cell: int  # pixels per image token in the model's view
    height: int  # the model's view of the image, pixels
    width: int
    view: str  # data:image/png;base64 of the model's view (what --save-selections draws on)


class Selections(BaseModel):
    images: list[ImageGrid]
    steps: list[list[Cell]]  # per latent step, its chosen image tokens


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    selections: Selections | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ivtlr_jax"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
