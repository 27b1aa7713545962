"""The console's HTTP API (JSON under ``/api``), its OpenAPI document, metrics and the page.

Every route is declared once in :data:`ROUTES` with its query, body and response models; the
aiohttp router and the OpenAPI document are both built from that table, so the document
cannot drift from what is served. Actions go through :class:`~orchestrator.operations.Operations`
(the saga rules, the operator named in the history) exactly as the CLI's do.

Errors are JSON ``{"error": "..."}`` with a status that says whose move it is: 400 (the request
is malformed), 401 (acting needs a token), 404 (no such saga or message), 409 (the saga rules
refuse the action, or a bulk count changed), 415 (a POST that is not JSON), 502 (the broker
refused a replay), 421 (a console bound to loopback asked under another host name: DNS
rebinding), 503 (the store or broker cannot be reached, or no broker is configured),
504 (the orchestrator daemon did not answer an action in time; the request expires unapplied).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, Final, TypeVar

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ValidationError

from orchestrator.console import models
from orchestrator.console.auth import OPERATOR_HEADER, Access, is_loopback
from orchestrator.engine import Action
from orchestrator.operations import Applied, Operations
from orchestrator.state import SagaStatus
from orchestrator.store import Cursor, SagaFilter, SagaStore
from plumbing.codec import validation_summary
from plumbing.errors import (
    ActionRefused,
    BrokerError,
    ConcurrencyExhausted,
    PublishFailed,
    SagaNotFound,
    StoreUnavailable,
)
from plumbing.parked import MessageNotParked, ParkedQueue, ReplayRefused

log = structlog.get_logger("console")

M = TypeVar("M", bound=BaseModel)
Handler = Callable[["ConsoleApi", web.Request], Awaitable[web.StreamResponse]]

_JSON: Final = "application/json"


@dataclass(frozen=True)
class Route:
    """One endpoint: how it is reached, what it takes and answers, and whether it acts."""

    method: str
    path: str
    operation: str
    summary: str
    response: type[BaseModel] | None
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    acts: bool = False
    errors: tuple[int, ...] = ()


class _Refusal(Exception):
    """Answer ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ConsoleApi:
    """The handlers, over a store, the operator actions and (if a broker is set) parking.

    Args:
        parked: parked messages, or ``None`` without a broker (those routes answer 503).
    """

    def __init__(
        self,
        store: SagaStore,
        operations: Operations,
        parked: ParkedQueue | None,
        access: Access,
        registry: CollectorRegistry,
    ) -> None:
        self.store = store
        self.operations = operations
        self.parked = parked
        self.access = access
        self.registry = registry

    # --- sagas ------------------------------------------------------------------------------

    async def list_sagas(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/sagas``."""
        query = _query(request, models.SagaQuery)
        listed = await self.store.find(
            SagaFilter(
                status=query.status,
                saga_type=query.saga_type,
                version=query.version,
                held=query.held,
                step=query.step,
                id_prefix=query.id_prefix,
                created_from=query.created_from,
                created_to=query.created_to,
                after=None if query.cursor is None else _decode_cursor(query.cursor),
                limit=query.limit,
            )
        )
        next_cursor = None
        if len(listed) == query.limit:
            last = listed[-1].state
            next_cursor = _encode_cursor(Cursor(last.updated_at, last.saga_id))
        page = models.SagaPage(
            sagas=[models.SagaSummary.model_validate(item.summary()) for item in listed],
            next_cursor=next_cursor,
        )
        return _json(page)

    async def counts(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/counts``."""
        counted = await self.store.count_by_status()
        return _json(
            models.Counts(
                statuses=list(SagaStatus),
                counts=[
                    models.StatusCount(saga_type=saga_type, status=SagaStatus(status), count=n)
                    for (saga_type, status), n in sorted(counted.items())
                ],
            )
        )

    async def show_saga(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/sagas/{saga_id}``."""
        saga_id = _path(request, "saga_id")
        record = await self.store.load(saga_id)
        if record is None:
            raise _Refusal(404, f"no saga has id {saga_id!r}")
        return _json(models.SagaDetail.model_validate(record.summary()))

    async def retry(self, request: web.Request) -> web.StreamResponse:
        """``POST /api/sagas/{saga_id}/retry``."""
        return await self._act(request, Action.RETRY)

    async def abort(self, request: web.Request) -> web.StreamResponse:
        """``POST /api/sagas/{saga_id}/abort``."""
        return await self._act(request, Action.ABORT)

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        """``POST /api/sagas/{saga_id}/resolve``."""
        return await self._act(request, Action.RESOLVE)

    async def _act(self, request: web.Request, action: Action) -> web.StreamResponse:
        by = self._operator(request)
        body = await _body(request, models.ActionRequest)
        saga_id = _path(request, "saga_id")
        applied = await self.operations.act(saga_id, action, by=by, reason=body.reason)
        return _json(_result(applied, action, by))

    async def bulk_retry(self, request: web.Request) -> web.StreamResponse:
        """``POST /api/bulk/retry``."""
        return await self._bulk(request, Action.RETRY)

    async def bulk_abort(self, request: web.Request) -> web.StreamResponse:
        """``POST /api/bulk/abort``."""
        return await self._bulk(request, Action.ABORT)

    async def bulk_resolve(self, request: web.Request) -> web.StreamResponse:
        """``POST /api/bulk/resolve``."""
        return await self._bulk(request, Action.RESOLVE)

    async def _bulk(self, request: web.Request, action: Action) -> web.StreamResponse:
        by = self._operator(request)
        body = await _body(request, models.BulkRequest)
        chosen = body.selection
        saga_ids = await self.operations.matching(
            SagaFilter(
                status=chosen.status,
                saga_type=chosen.saga_type,
                version=chosen.version,
                step=chosen.step,
                id_prefix=chosen.id_prefix,
            )
        )
        if body.dry_run:
            return _json(
                models.BulkResult(
                    action=action, matched=len(saga_ids), dry_run=True, applied=[], refused=[]
                )
            )
        if body.expected != len(saga_ids):
            raise _Refusal(
                409,
                f"{len(saga_ids)} sagas match now, not {body.expected}: "
                "nothing was done; confirm the new count",
            )
        outcome = await self.operations.bulk(saga_ids, action, by=by, reason=body.reason)
        return _json(
            models.BulkResult(
                action=action,
                matched=len(saga_ids),
                dry_run=False,
                applied=[_result(applied, action, by) for applied in outcome.applied],
                refused=[
                    models.Refusal(saga_id=r.saga_id, reason=r.reason) for r in outcome.refused
                ],
            )
        )

    # --- parked messages --------------------------------------------------------------------

    async def list_parked(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/parked``."""
        query = _query(request, models.ParkedQuery)
        found = await self._parking().list(query.limit)
        return _json(
            models.ParkedList(parked=[models.ParkedView.model_validate(m.summary()) for m in found])
        )

    async def show_parked(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/parked/{message_id}``."""
        message = await self._parking().get(_path(request, "message_id"))
        return _json(models.ParkedView.model_validate(message.summary(whole=True)))

    async def replay_parked(self, request: web.Request) -> web.StreamResponse:
        """``POST /api/parked/{message_id}/replay``."""
        by = self._operator(request)
        await _body(request, models.NoFields)
        message = await self._parking().replay(_path(request, "message_id"))
        log.info("parked_message_replayed", message_id=message.message_id, by=by)
        return _json(
            models.ParkedResult(
                message_id=message.message_id, outcome="replayed", queue=message.queue
            )
        )

    async def discard_parked(self, request: web.Request) -> web.StreamResponse:
        """``POST /api/parked/{message_id}/discard``."""
        by = self._operator(request)
        await _body(request, models.NoFields)
        message = await self._parking().discard(_path(request, "message_id"))
        log.info("parked_message_discarded", message_id=message.message_id, by=by)
        return _json(
            models.ParkedResult(
                message_id=message.message_id, outcome="discarded", queue=message.queue
            )
        )

    def _parking(self) -> ParkedQueue:
        if self.parked is None:
            raise _Refusal(503, "no broker is configured (SAGA_AMQP_URL): parked messages unseen")
        return self.parked

    # --- the rest ---------------------------------------------------------------------------

    async def whoami(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/whoami``."""
        operator = self.access.operator(
            request.headers.get("Authorization"), request.headers.get(OPERATOR_HEADER)
        )
        return _json(
            models.WhoAmI(
                operator=operator,
                actions_need_token=self.access.needs_token,
                can_act=operator is not None,
            )
        )

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        """``GET /openapi.json``."""
        from orchestrator.console.openapi import openapi_document

        return web.json_response(openapi_document())

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        """``GET /metrics``: the console's own counters (the operator actions it applied)."""
        response = web.Response(body=generate_latest(self.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def page(self, request: web.Request) -> web.StreamResponse:
        """``GET /``: the page."""
        return web.Response(text=_static("index.html"), content_type="text/html")

    async def asset(self, request: web.Request) -> web.StreamResponse:
        """``GET /static/{name}``: the page's script and style."""
        name = request.match_info["name"]
        types = {"js": "text/javascript", "css": "text/css"}
        kind = types.get(name.rpartition(".")[2])
        if kind is None or "/" in name or name.startswith("."):
            raise _Refusal(404, f"no asset {name!r}")
        try:
            text = _static(name)
        except FileNotFoundError as e:
            raise _Refusal(404, f"no asset {name!r}") from e
        return web.Response(text=text, content_type=kind)

    def _operator(self, request: web.Request) -> str:
        operator = self.access.operator(
            request.headers.get("Authorization"), request.headers.get(OPERATOR_HEADER)
        )
        if operator is None:
            raise _Refusal(401, "acting needs a console token: send Authorization: Bearer TOKEN")
        return operator


_PROBLEMS: Final[dict[type[Exception], int]] = {
    SagaNotFound: 404,
    MessageNotParked: 404,
    ActionRefused: 409,
    ReplayRefused: 409,
    PublishFailed: 502,
    ConcurrencyExhausted: 503,
    StoreUnavailable: 503,
    BrokerError: 503,
    TimeoutError: 504,
}

PAGE_ROUTES: Final = (
    Route("GET", "/", "page", "The console page.", None),
    Route("GET", "/static/{name}", "asset", "The page's script and style.", None, errors=(404,)),
    Route("GET", "/metrics", "metrics", "The console's metrics (Prometheus text).", None),
)
"""Routes that serve no JSON: left out of the OpenAPI document."""

ROUTES: Final = (
    Route(
        "GET",
        "/api/sagas",
        "list_sagas",
        "List sagas, newest update first, filtered; page with next_cursor.",
        models.SagaPage,
        query=models.SagaQuery,
        errors=(400, 503),
    ),
    Route(
        "GET",
        "/api/counts",
        "counts",
        "Count sagas per type and status.",
        models.Counts,
        errors=(503,),
    ),
    Route(
        "GET",
        "/api/sagas/{saga_id}",
        "show_saga",
        "One saga: data, step results, errors, attempts and history.",
        models.SagaDetail,
        errors=(404, 503),
    ),
    *(
        Route(
            "POST",
            f"/api/sagas/{{saga_id}}/{action.value}",
            action.value,
            f"{action.value.capitalize()} a saga, through the saga rules.",
            models.ActionResult,
            body=models.ActionRequest,
            acts=True,
            errors=(400, 401, 404, 409, 415, 503, 504),
        )
        for action in Action
    ),
    *(
        Route(
            "POST",
            f"/api/bulk/{action.value}",
            f"bulk_{action.value}",
            f"{action.value.capitalize()} every saga a selection matches (dry run first).",
            models.BulkResult,
            body=models.BulkRequest,
            acts=True,
            errors=(400, 401, 409, 415, 503, 504),
        )
        for action in Action
    ),
    Route(
        "GET",
        "/api/parked",
        "list_parked",
        "List parked messages, oldest first.",
        models.ParkedList,
        query=models.ParkedQuery,
        errors=(400, 404, 503),
    ),
    Route(
        "GET",
        "/api/parked/{message_id}",
        "show_parked",
        "One parked message: why, from where, headers and body.",
        models.ParkedView,
        errors=(404, 503),
    ),
    Route(
        "POST",
        "/api/parked/{message_id}/replay",
        "replay_parked",
        "Send a parked message back to the queue it was parked from.",
        models.ParkedResult,
        body=models.NoFields,
        acts=True,
        errors=(400, 401, 404, 409, 415, 502, 503),
    ),
    Route(
        "POST",
        "/api/parked/{message_id}/discard",
        "discard_parked",
        "Delete a parked message for good.",
        models.ParkedResult,
        body=models.NoFields,
        acts=True,
        errors=(400, 401, 404, 415, 503),
    ),
    Route(
        "GET",
        "/api/whoami",
        "whoami",
        "Who the console takes the caller for, and whether actions need a token.",
        models.WhoAmI,
    ),
    Route("GET", "/openapi.json", "openapi", "This API's OpenAPI 3.1 document.", None),
)
"""The JSON API, in the OpenAPI document's order."""


def build_app(api: ConsoleApi) -> web.Application:
    """The aiohttp application serving ``api``'s routes."""
    middlewares = [_problems]
    if api.access.local:
        middlewares.insert(0, _loopback_hosts_only)
    app = web.Application(middlewares=middlewares, client_max_size=1024 * 1024)
    for route in (*ROUTES, *PAGE_ROUTES):
        handler = getattr(api, route.operation)
        app.router.add_route(route.method, route.path, handler, name=route.operation)
    return app


@web.middleware
async def _loopback_hosts_only(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A console bound to loopback answers only requests addressed to a loopback name: a web
    page whose own domain was re-pointed at 127.0.0.1 (DNS rebinding) gets nothing."""
    host = _host_name(request.host)
    if not is_loopback(host):
        return _problem(421, f"this console answers requests to localhost only, not {host!r}")
    return await handler(request)


def _host_name(header: str) -> str:
    """The name in a Host header without its port (``[::1]:8474`` is ``::1``)."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.partition(":")[0]


@web.middleware
async def _problems(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn refusals and the errors operators can meet into ``{"error": ...}`` answers."""
    if request.method == "POST" and request.content_type != _JSON:
        return _problem(415, "send the request as Content-Type: application/json")
    try:
        return await handler(request)
    except _Refusal as e:
        return _problem(e.status, e.message)
    except web.HTTPException as e:
        if e.status >= 400:
            return _problem(e.status, e.reason)
        raise
    except tuple(_PROBLEMS) as e:
        status = next(code for kind, code in _PROBLEMS.items() if isinstance(e, kind))
        if status >= 500:
            log.warning("console_request_failed", path=request.path, error=str(e))
        return _problem(status, str(e))


def _problem(status: int, message: str) -> web.Response:
    return web.Response(
        status=status, body=models.Problem(error=message).model_dump_json(), content_type=_JSON
    )


def _path(request: web.Request, name: str) -> str:
    value = request.match_info[name]
    if "\x00" in value:  # no id holds a NUL (PostgreSQL could not even look one up)
        raise _Refusal(404, f"no {name.replace('_', ' ')} {value!r} exists")
    return value


def _json(model: BaseModel) -> web.Response:
    return web.Response(body=model.model_dump_json(), content_type=_JSON)


def _query(request: web.Request, model: type[M]) -> M:
    values: dict[str, Any] = {}
    for key in request.query:
        given = request.query.getall(key)[-1]
        if given != "":  # an empty field of a form is a filter not given
            values[key] = given
    try:
        return model.model_validate_strings(values)
    except ValidationError as e:
        raise _Refusal(400, f"bad query: {validation_summary(e)}") from e


async def _body(request: web.Request, model: type[M]) -> M:
    raw = await request.read()
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as e:
        raise _Refusal(400, f"bad request body: {validation_summary(e)}") from e


def _result(applied: Applied, action: Action, by: str) -> models.ActionResult:
    return models.ActionResult(
        saga_id=applied.saga_id,
        action=action,
        before=applied.before,
        after=applied.after,
        unsent=applied.unsent,
        by=by,
    )


def _encode_cursor(cursor: Cursor) -> str:
    text = json.dumps([cursor.updated_at.isoformat(), cursor.saga_id])
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode_cursor(text: str) -> Cursor:
    try:
        padded = text + "=" * (-len(text) % 4)
        at, saga_id = json.loads(base64.urlsafe_b64decode(padded.encode()))
        updated_at = datetime.fromisoformat(at)
    except (ValueError, TypeError, binascii.Error) as e:
        raise _Refusal(400, "bad query: cursor is not one this console gave out") from e
    if updated_at.tzinfo is None or not isinstance(saga_id, str):
        raise _Refusal(400, "bad query: cursor is not one this console gave out")
    return Cursor(updated_at, saga_id)


def _static(name: str) -> str:
    return (resources.files("orchestrator.console") / "static" / name).read_text("utf-8")
