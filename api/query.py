"""Query strings: a route with query parameters refuses any it does not declare, so a misspelt
filter (`?pipline=`) is an error naming the known ones, not a silently unfiltered answer."""

from __future__ import annotations

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute


def _query_names(dependant: Dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def declared_query_only(request: Request) -> None:
    """422 invalid_request naming a query parameter the route does not declare (and those it does)."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    declared = _query_names(route.dependant)
    unknown = [name for name in request.query_params if name not in declared]
    if declared and unknown:
        raise RequestValidationError(
            [
                {
                    "type": "extra_forbidden",
                    "loc": ("query", name),
                    "msg": f"unknown query parameter; this operation takes {', '.join(sorted(declared))}",
                    "input": request.query_params[name],
                }
                for name in unknown
            ]
        )
