"""The console API's OpenAPI 3.1 document, built from the route table and pydantic's schemas."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any, Final

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from orchestrator.console import models
from orchestrator.console.api import ROUTES, Route

_REF: Final = "#/components/schemas/{model}"
_PATH_PARAM = re.compile(r"\{(\w+)\}")
_REASONS: Final = {
    400: "The request is malformed.",
    401: "Acting needs a console token.",
    404: "No such saga or message.",
    409: "The saga rules refuse the action, or the bulk count changed.",
    415: "A POST must be JSON.",
    421: "A console bound to loopback was asked under another host name.",
    502: "The broker did not take the replayed message.",
    503: "The store or the broker cannot be reached, or no broker is configured.",
    504: "The orchestrator daemon did not answer the action in time; nothing was done.",
}


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The document ``GET /openapi.json`` serves."""
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(models.Problem, "serialization")]
    for route in ROUTES:
        if route.response is not None:
            wanted.append((route.response, "serialization"))
        if route.body is not None:
            wanted.append((route.body, "validation"))
    refs, definitions = models_json_schema(wanted, ref_template=_REF)
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "saga-orchestrator console",
            "version": "1",
            "description": (
                "Sagas, their actions (through the saga rules) and parked messages. Reading "
                "is open; actions need a bearer token when the console has tokens or is "
                "bound beyond this machine."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
        },
    }


def _operation(route: Route, refs: Mapping[Any, dict[str, Any]]) -> dict[str, Any]:
    operation: dict[str, Any] = {"operationId": route.operation, "summary": route.summary}
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
        for name in _PATH_PARAM.findall(route.path)
    ]
    if route.query is not None:
        schema = route.query.model_json_schema(ref_template=_REF)
        for name, field in schema["properties"].items():
            parameters.append(
                {
                    "name": name,
                    "in": "query",
                    "required": False,
                    "schema": {k: v for k, v in field.items() if k != "description"},
                    **({"description": field["description"]} if "description" in field else {}),
                }
            )
    if parameters:
        operation["parameters"] = parameters
    if route.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[route.body, "validation"]}},
        }
    if route.response is None:
        answer: dict[str, Any] = {"description": "This document.", "content": {}}
        answer["content"]["application/json"] = {"schema": {"type": "object"}}
    else:
        answer = {
            "description": "OK",
            "content": {"application/json": {"schema": refs[route.response, "serialization"]}},
        }
    problem = {"application/json": {"schema": refs[models.Problem, "serialization"]}}
    operation["responses"] = {
        "200": answer,
        **{
            str(code): {"description": _REASONS[code], "content": problem}
            for code in sorted({*route.errors, 421})  # any route, on a local console
        },
    }
    if route.acts:
        operation["security"] = [{}, {"token": []}]
    return operation
