"""`moemesh serve`: the OpenAI API over HTTP (chat completions with tools and reasoning,
completions, models, health) and the chat page, on one Scheduler that batches every request.

Starlette on uvicorn rather than hand-written HTTP: both are small, well kept and what the
Python ecosystem serves ASGI with; they give us HTTP/1.1 keep-alive, streaming responses
(server-sent events) and notice of a client that went away, which cancels its sequence. The
request and response formats are coordinator.openai_format (pure functions); this module is only
the HTTP side: routes, authentication, errors as OpenAI error objects, and the bridge from the
scheduler's thread to the event loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import sys
import traceback
from dataclasses import dataclass, field
from importlib import resources

from .batching import Scheduler, SchedulerFull
from .drafting import DraftParams
from .generation import ContextLimitError
from .openai_format import (ApiError, ChatReply, StopMatcher, bad, chunk, new_id, now, parse_chat_request,
                            parse_completion_request, timings, usage)

DEFAULT_CHAT_MAX_TOKENS = 4096  # when a request sets none: room for reasoning and an answer
DISCONNECT_POLL_S = 0.25


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    parallel: int = 4
    draft: DraftParams = field(default_factory=DraftParams)


class Service:
    """The engine, its tokenizer and the scheduler behind the routes."""

    def __init__(self, engine, tokenizer, config: ServeConfig):
        self.engine, self.tok, self.config = engine, tokenizer, config
        self.chat = engine.chat_format(tokenizer)
        self.scheduler = Scheduler(engine, parallel=config.parallel)
        self.created = now()

    def devices(self) -> list[dict]:
        """Who computes: this device (dense part, and the experts unless a cluster has them) and
        every expert node with its state."""
        experts = self.engine.model.experts
        me = {"name": "coordinator", "role": "dense" if hasattr(experts, "clients") else "dense + experts", "up": True}
        nodes = []
        for node_id, client in sorted(getattr(experts, "clients", {}).items()):
            held = sum(node_id in hosts for layer in experts.placement.hosts for hosts in layer)
            nodes.append({"name": client.info.name, "address": client.address, "role": f"{held} experts",
                          "up": experts.is_up(node_id)})
        return [me] + nodes

    async def run(self, prompt_ids: list[int], max_tokens: int, params, stop_ids, is_disconnected, tokenizer=None):
        """Submit a generation; yield (step list) as the scheduler produces them (with a tokenizer,
        each Step carries its text). A client gone (is_disconnected) or a consumer that stops
        iterating cancels the sequence."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        generation = self.engine.stream(prompt_ids, max_tokens, params, stop_ids, tokenizer, draft=self.config.draft)
        try:
            request = self.scheduler.submit(generation, lambda item: loop.call_soon_threadsafe(items.put_nowait, item))
        except SchedulerFull as e:
            raise ApiError(503, f"the server is busy ({e}); try again shortly", kind="server_busy") from None
        try:
            while True:
                try:
                    item = await asyncio.wait_for(items.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await is_disconnected():
                        return
                    continue
                if item is None:
                    return
                if isinstance(item, ContextLimitError):
                    raise ApiError(400, str(item), "messages", "context_length_exceeded")
                if isinstance(item, ValueError):
                    raise bad(str(item))
                if isinstance(item, Exception):
                    print(f"moemesh serve: generation failed: {item}", file=sys.stderr)
                    raise ApiError(500, f"generation failed: {item}", kind="server_error")
                yield item, generation.stats
        finally:
            request.cancel()


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(service: Service):
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    config = service.config

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    async def read_json(request):
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON ({e})") from None

    async def health(request):
        active, waiting = service.scheduler.busy
        return JSONResponse({"status": "ok", "slots": config.parallel, "slots_busy": active, "waiting": waiting})

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": config.model_name, "object": "model",
                                                         "created": service.created, "owned_by": "moemesh"}]})

    async def devices(request):
        return JSONResponse({"devices": service.devices()})

    async def chat_completions(request):
        req = parse_chat_request(await read_json(request), DEFAULT_CHAT_MAX_TOKENS)
        prompt = service.chat.render_prompt(req.history, req.reasoning_effort, req.instructions, tools=req.tools)
        rid, created, model = new_id("chatcmpl"), now(), config.model_name
        parser, reply = service.chat.parser(), ChatReply(StopMatcher(req.stop))
        steps = service.run(prompt, req.max_tokens, req.params, service.chat.stop_ids, request.is_disconnected)

        async def deltas():
            """(delta, finish_reason, stats): the finish reason on the last one only."""
            finish, stats = "stop", None
            async for batch, stats in steps:
                for step in batch:
                    for d in parser.feed(step.token):
                        yield reply.add(d), None, stats
                    if step.finish_reason:
                        finish = step.finish_reason
                if reply.stop.stopped:
                    break
            for d in parser.finish():
                yield reply.add(d), None, stats
            if finish == "stop" and reply.tool_calls:
                finish = "tool_calls"
            yield reply.finish(), finish, stats

        if not req.stream:
            finish, stats = "stop", None
            async for _, fin, stats in deltas():
                finish = fin or finish
            return JSONResponse(chunk("chat.completion", rid, model, created,
                                      {"message": reply.message(), "finish_reason": finish, "logprobs": None},
                                      usage=usage(len(prompt), stats),
                                      timings=timings(stats) if stats else None))
        first = await first_or_error(deltas())

        async def events():
            yield sse(chunk("chat.completion.chunk", rid, model, created,
                            {"delta": {"role": "assistant", "content": ""}, "finish_reason": None}))
            stats = None
            async for ds, finish, stats in first:
                for d in ds:
                    yield sse(chunk("chat.completion.chunk", rid, model, created, {"delta": d, "finish_reason": None}))
                if finish:
                    yield sse(chunk("chat.completion.chunk", rid, model, created, {"delta": {}, "finish_reason": finish},
                                    timings=timings(stats) if stats else None))
            if req.include_usage:
                yield sse(chunk("chat.completion.chunk", rid, model, created, None,
                                usage=usage(len(prompt), stats)))
            yield "data: [DONE]\n\n"
        return StreamingResponse(guarded(events()), media_type="text/event-stream")

    async def completions(request):
        req = parse_completion_request(await read_json(request))
        prompt = service.tok.encode(req.prompt)
        if not prompt:
            raise bad("the prompt encodes to no tokens", "prompt")
        rid, created, model = new_id("cmpl"), now(), config.model_name
        stop = StopMatcher(req.stop)
        steps = service.run(prompt, req.max_tokens, req.params, (), request.is_disconnected, service.tok)

        async def pieces():
            finish, stats = "length", None
            async for batch, stats in steps:
                finish = batch[-1].finish_reason or finish
                out = stop.feed("".join(step.text for step in batch))
                if out:
                    yield out, None, stats
                if stop.stopped:
                    finish = "stop"
                    break
            yield stop.flush(), finish, stats

        if not req.stream:
            text, finish, stats = "", "length", None
            async for piece, fin, stats in pieces():
                text += piece
                finish = fin or finish
            return JSONResponse(chunk("text_completion", rid, model, created,
                                      {"text": text, "finish_reason": finish, "logprobs": None},
                                      usage=usage(len(prompt), stats)))
        first = await first_or_error(pieces())

        async def events():
            stats = None
            async for piece, finish, stats in first:
                if piece or finish:
                    yield sse(chunk("text_completion", rid, model, created,
                                    {"text": piece, "finish_reason": finish, "logprobs": None}))
            if req.include_usage:
                yield sse(chunk("text_completion", rid, model, created, None,
                                usage=usage(len(prompt), stats)))
            yield "data: [DONE]\n\n"
        return StreamingResponse(guarded(events()), media_type="text/event-stream")

    def endpoint(fn):
        async def handle(request):
            if config.api_key is not None and not authorized(request, config.api_key):
                return error(ApiError(401, "invalid API key: send it as 'Authorization: Bearer KEY'",
                                      code="invalid_api_key"))
            try:
                return await fn(request)
            except ApiError as e:
                return error(e)
            except Exception:  # noqa: BLE001 (logged here; the client gets an error object, not a traceback)
                traceback.print_exc(file=sys.stderr)
                return error(ApiError(500, "internal error (see the server's log)", kind="server_error"))
        return handle

    async def http_error(request, exc: HTTPException):
        kinds = {404: f"no route {request.method} {request.url.path}", 405: f"{request.method} is not allowed here"}
        return error(ApiError(exc.status_code, kinds.get(exc.status_code, str(exc.detail))))

    page = resources.files("coordinator") / "web"
    routes = [
        Route("/health", health),
        Route("/v1/models", endpoint(models)),
        Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/api/devices", endpoint(devices)),
        Mount("/", StaticFiles(directory=str(page), html=True)),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        service.scheduler.close()

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)


def authorized(request, key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


async def first_or_error(gen):
    """Run a stream up to its first item before the response starts, so a request refused then
    (a full server, a prompt over the context) is answered with its status code, not a 200
    stream that breaks off. Returns an iterator over every item."""
    try:
        head = await gen.__anext__()
    except StopAsyncIteration:
        head = None

    async def rest():
        if head is not None:
            yield head
        async for item in gen:
            yield item
    return rest()


async def guarded(events):
    """A stream that fails after it started ends with an error event (the status is sent)."""
    try:
        async for e in events:
            yield e
    except ApiError as e:
        yield sse(e.body())
