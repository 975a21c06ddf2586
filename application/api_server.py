"""OpenAI-compatible HTTP API over one speculative-decoding model.

    python -m application.api_server [--base-model-path ... --ea-model-path ...] [--port 8000]

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with
`"stream": true` for server-sent events), GET /v1/models, GET
/v1/models/{id}, GET /health.
Responses carry OpenAI's fields plus `speculative_stats` (iterations,
accepted draft tokens, mean accepted length, seconds, tokens/s); requests may add `"speculative": false` for
plain decoding. Requests run one at a time on the model, in arrival order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Annotated, Any, AsyncIterator, Awaitable, Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt, field_validator
from starlette.exceptions import HTTPException

from eagle_gto import GenerationStats

from .chat_runner import ChatRunner, ContextLengthError, GenerationOptions
from .server_options import build_parser, check_address, load_runner, model_name
from .text_stream import StopStrings, until_stop

log = logging.getLogger("eagle_gto.api")


# ---------------------------------------------------------------- requests
class ContentPart(BaseModel):
    type: str  # any, so that one other than "text" gets its own error (check_parts), not a union's
    text: str | None = None


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


def check_parts(messages: list[Message]) -> None:
    for i, message in enumerate(messages):
        for j, part in enumerate([] if isinstance(message.content, str) else message.content):
            if part.type != "text":
                raise APIError(400, f"only text content parts are supported, not {part.type!r}",
                               f"messages.{i}.content.{j}.type")
            if part.text is None:
                raise APIError(400, "a text content part needs its text", f"messages.{i}.content.{j}.text")


class StreamOptions(BaseModel):
    include_usage: StrictBool = False

    @field_validator("include_usage", mode="before")
    @classmethod
    def null_is_default(cls, value):
        return False if value is None else value


# Stop strings are looked for after every step, on the event loop, at a cost that grows with their number:
# 100,000 of them (2 MB of JSON) took 0.2 s a step there, which every other client would wait through.
# OpenAI takes 4; code completion harnesses send a few more ("\ndef", "\nclass", "\nif", "\nprint", ...).
MAX_STOPS = 64


class Sampling(BaseModel):
    """Fields both endpoints take; defaults are OpenAI's. Unknown fields are ignored."""

    model: str | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    # (a JSON integer is taken; "0.5" or true is not)
    temperature: StrictFloat = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: StrictFloat = Field(1.0, ge=0, le=1, allow_inf_nan=False)  # 0: the most probable token only
    n: StrictInt = Field(1, ge=1, le=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    seed: StrictInt | None = Field(None, ge=-2**63, le=2**64 - 1)  # what torch.Generator takes
    speculative: StrictBool = True  # an extension: false decodes plainly, for comparison
    logprobs: bool | int | None = None  # not served: only false, 0 or null pass (UNSUPPORTED)
    presence_penalty: Any = None  # not served, nor the others below: they would change the answer
    frequency_penalty: Any = None
    logit_bias: Any = None

    @field_validator("temperature", "top_p", "n", "stream", "speculative", mode="before")
    @classmethod
    def null_is_default(cls, value, info):
        return cls.model_fields[info.field_name].default if value is None else value

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    top_logprobs: int | None = None  # not served
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None


class CompletionRequest(Sampling):
    prompt: str | list[str]
    echo: bool | None = None  # not served
    best_of: Any = None
    suffix: Any = None


FIELDS = {name for model in (ChatRequest, CompletionRequest, Message, ContentPart, StreamOptions)
          for name in model.model_fields}
# Fields whose answer this server cannot give: refused, unless they ask for nothing (false, 0, null, empty,
# or the value here, which clients such as LangChain send by default).
UNSUPPORTED = {"echo": (), "logprobs": (), "top_logprobs": (), "presence_penalty": (), "frequency_penalty": (),
               "logit_bias": (), "response_format": ({"type": "text"},), "tools": (), "tool_choice": ("none", "auto"),
               "functions": (), "function_call": ("none", "auto"), "best_of": (1,), "suffix": ()}


def field_path(loc: tuple) -> str:
    """The parameter as the client wrote it: "messages.0.content" for pydantic's
    ("body", "messages", 0, "content", "str"), without the union branch it tried."""
    return ".".join(str(part) for part in loc if isinstance(part, int) or part in FIELDS)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def prompt_error(err: ValueError, param: str) -> APIError:
    """A prompt the runner refuses: OpenAI's code for one too long for the context."""
    code = "context_length_exceeded" if isinstance(err, ContextLengthError) else None
    return APIError(400, str(err), param, code)


# ----------------------------------------------------------------- answers
class Endpoint:
    """How one endpoint writes an answer: chat messages or plain text."""

    def __init__(self, chat: bool):
        self.chat = chat
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.id_prefix = "chatcmpl-" if chat else "cmpl-"

    def choice(self, text: str, finish_reason: str | None, delta: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if delta:
            return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}


def usage(prompt_tokens: int, stats) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": stats.new_tokens,
            "total_tokens": prompt_tokens + stats.new_tokens}


def speculative_stats(stats, speculative: bool) -> dict:
    return {"speculative": speculative, "iterations": stats.iterations,
            # a step cut by max_tokens or a stop token delivers fewer drafts than it accepted
            "accepted_draft_tokens": sum(min(s.num_accepted, len(s.tokens)) for s in stats.steps),
            "mean_accepted_length": round(stats.mean_accepted_length, 4),
            "tokens_per_second": round(stats.tokens_per_second, 2), "seconds": round(stats.seconds, 4)}


class ModelStream(StreamingResponse):
    """An event stream that closes its generation however the response ends,
    a client disconnect included, so the model is freed for the next request."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def http_api_error(err: HTTPException) -> APIError:
    """Starlette's error (an unknown route, a wrong method, a body too large) in the API's words."""
    return APIError(err.status_code, str(err.detail), code="request_too_large" if err.status_code == 413 else None)


class BodyLimit:
    """Refuses a request body over `limit` bytes (413) before it is read whole: FastAPI keeps all of it in
    memory and parses it on the event loop that every client shares (about 1 s for 50 MB). A declared
    Content-Length is refused at once; a chunked body when its bytes pass the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def too_large(self) -> HTTPException:
        return HTTPException(413, f"the request body is larger than the server's limit of {self.limit} bytes "
                                  "(--max-request-mb)")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            err = http_api_error(self.too_large())
            return await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b"")) if message["type"] == "http.request" else 0
            if received > self.limit:
                raise self.too_large()  # inside the route, whose body reading passes it on to http_error
            return message

        await self.app(scope, limited_receive, send)


async def cancel_when_gone(connection: Request, scope: anyio.CancelScope) -> None:
    """Waits for the client to go away (the body is read already, so that is the next message), then cancels."""
    while (await connection.receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def unless_disconnected(connection: Request, work: Awaitable):
    """`work`'s result, or None if the client goes away first. `work` is then cancelled: a request
    waiting for the model leaves the queue, a generation is closed after its current step."""
    # An anyio scope, not Task.cancel: anyio.to_thread.run_sync holds an anyio cancellation back until
    # the step running in its thread is done, so that the generation can then be closed.
    with anyio.CancelScope() as scope:
        watcher = asyncio.ensure_future(cancel_when_gone(connection, scope))
        try:
            return await work
        finally:
            watcher.cancel()
    return None


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


# --------------------------------------------------------------------- app
def create_app(runner: ChatRunner, name: str, max_new_tokens: int, max_request_bytes: int = 32 * 2**20) -> FastAPI:
    app = FastAPI(title="eagle-gto API")
    app.add_middleware(BodyLimit, limit=max_request_bytes)
    # Waiting requests queue here, in arrival order, without holding a thread;
    # the runner's own lock is the guarantee, this is the fair queue in front of it.
    model_lock = asyncio.Lock()

    async def answer(prompt_ids: list[int], options: GenerationOptions, stops: list[str],
                     chat: bool) -> AsyncIterator[tuple]:
        """(new text, finish_reason or None, stats) per iteration, stop strings applied."""
        async with model_lock:
            updates = runner.generate(prompt_ids, options, chat)
            try:
                # A chat answer also ends before its format's end of turn written as text (ChatRunner.stop_strings).
                stopper = StopStrings(stops + list(runner.stop_strings) if chat else stops)
                while True:
                    # Not cancellable mid-step: a disconnect waits for the step, then closes the generation.
                    update = await anyio.to_thread.run_sync(next, updates)
                    text = stopper.feed(update.text)
                    if stopper.hit:
                        yield text, "stop", until_stop(update.stats, runner.text_stream(prompt_ids, chat), stopper.end)
                        return
                    if update.step.finished:
                        yield text + stopper.flush(), update.step.finish_reason, update.stats
                        return
                    yield text, None, update.stats
            finally:
                updates.close()

    def model_not_found(model: str) -> APIError:
        return APIError(404, f"the model {model!r} does not exist; this server serves {name!r}", "model",
                        "model_not_found")

    async def whole(events) -> tuple[str, str, GenerationStats]:
        text, reason, stats = "", None, None
        async for piece, reason, stats in events:
            text += piece
        return text, reason, stats

    async def complete(endpoint: Endpoint, request: Sampling, prompt_ids: list[int], max_tokens: int | None,
                       connection: Request):
        if request.model not in (None, name):
            raise model_not_found(request.model)
        for field, nothing in UNSUPPORTED.items():
            value = getattr(request, field, None)
            if value and value not in nothing:
                raise APIError(400, f"{field} is not supported by this server", field)
        if request.stream_options is not None and not request.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
        # The server's --max-new-tokens is both the default and the upper bound (GET /v1/models
        # tells it); an answer cut there ends with finish_reason "length", as at the client's own limit.
        options = GenerationOptions(min(max_tokens or max_new_tokens, max_new_tokens), request.temperature,
                                    request.top_p, request.speculative, request.seed)
        param = "messages" if endpoint.chat else "prompt"
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param)
        try:
            runner.check_fits(prompt_ids)
        except ContextLengthError as err:
            raise prompt_error(err, param) from err
        head = {"id": endpoint.id_prefix + uuid.uuid4().hex, "created": int(time.time()), "model": name}
        events = answer(prompt_ids, options, request.stops(), endpoint.chat)
        if request.stream:
            return ModelStream(stream(endpoint, head, events, len(prompt_ids), request), media_type="text/event-stream")
        try:
            result = await unless_disconnected(connection, whole(events))
        except Exception as err:
            log.exception("generation failed")
            raise APIError(500, f"generation failed: {err}", kind="server_error") from err
        if result is None:  # the client went away: nobody to answer
            return Response(status_code=499)
        text, reason, stats = result
        return {**head, "object": endpoint.object, "choices": [endpoint.choice(text, reason)],
                "usage": usage(len(prompt_ids), stats),
                "speculative_stats": speculative_stats(stats, request.speculative)}

    async def stream(endpoint: Endpoint, head: dict, events, prompt_tokens: int, request: Sampling):
        chunk = {**head, "object": endpoint.chunk_object}
        if endpoint.chat:
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            yield sse({**chunk, "choices": [first]})
        try:
            async for text, reason, stats in events:
                if text or reason:
                    body = {**chunk, "choices": [endpoint.choice(text, reason, delta=True)]}
                    if reason:
                        body["speculative_stats"] = speculative_stats(stats, request.speculative)
                    yield sse(body)
        except Exception as err:  # the status line is sent already: report in the stream
            log.exception("generation failed")
            yield sse(APIError(500, f"generation failed: {err}", kind="server_error").body())
            return
        finally:
            await events.aclose()
        if request.stream_options and request.stream_options.include_usage:
            yield sse({**chunk, "choices": [], "usage": usage(prompt_tokens, stats)})
        yield sse("[DONE]")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest, connection: Request):
        check_parts(request.messages)
        try:  # in a worker thread: a long prompt's tokenization would hold up every other client
            prompt_ids = await anyio.to_thread.run_sync(runner.chat_prompt, [m.as_dict() for m in request.messages])
        except ValueError as err:
            raise prompt_error(err, "messages") from err
        return await complete(Endpoint(chat=True), request, prompt_ids,
                              request.max_completion_tokens or request.max_tokens, connection)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, connection: Request):
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if len(prompts) != 1:
            raise APIError(400, f"give one prompt per request, got {len(prompts)}", "prompt")
        try:
            prompt_ids = await anyio.to_thread.run_sync(runner.text_prompt, prompts[0])
        except ValueError as err:
            raise prompt_error(err, "prompt") from err
        return await complete(Endpoint(chat=False), request, prompt_ids, request.max_tokens, connection)

    # An answer also ends where the context does.
    card = {"id": name, "object": "model", "created": 0, "owned_by": "eagle-gto",
            "max_tokens": min(max_new_tokens, runner.longest_answer)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}")  # a path: hub ids and folders have slashes
    async def retrieve_model(model: str):
        if model != name:
            raise model_not_found(model)
        return card

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "busy": model_lock.locked()}

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, err: RequestValidationError):
        first = err.errors()[0]
        where = field_path(first["loc"])
        content_type = _.headers.get("content-type")
        kind = (content_type or "").split(";")[0].strip().lower()
        if first["type"] == "json_invalid":
            message, where = "the request body is not valid JSON", ""
        elif not where and not (kind == "application/json" or kind.endswith("+json")):
            # FastAPI reads a body as JSON only under a JSON content type; `curl -d` sends a form's.
            sent = f"as {content_type!r}" if content_type else "without a Content-Type"
            message = f"the request body was sent {sent}, so not read as JSON: send it with Content-Type: " \
                      "application/json"
        elif not where:
            message = f"the request body must be a JSON object: {first['msg']}"
        else:
            message = f"{where}: {first['msg']}"
        return await api_error(_, APIError(400, message, where or None))

    @app.exception_handler(Exception)
    async def server_error(_: Request, err: Exception):  # a bug, still answered in the API's error format
        log.exception("request failed")
        return await api_error(_, APIError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error"))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException):
        return await api_error(_, http_api_error(err))

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = build_parser("python -m application.api_server",
                          "OpenAI-compatible HTTP API over an EAGLE speculative-decoding model.", port=8000)
    parser.add_argument("--max-request-mb", type=float, default=32,
                        help="largest request body in MiB; larger ones get 413 (default: 32)")
    args = parser.parse_args(argv)
    if not args.max_request_mb > 0:
        parser.error(f"--max-request-mb must be above 0, got {args.max_request_mb}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_address(parser, args.host, args.port)
    runner = load_runner(parser, args)
    app = create_app(runner, model_name(args), args.max_new_tokens, int(args.max_request_mb * 2**20))
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
