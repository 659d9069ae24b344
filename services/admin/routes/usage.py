"""Usage of any tenant, environment, key, model or region, per hour or day, grouped as asked,
with the period's total (whole hours from usage_hourly, the rest from usage_records: see
services/domain/usage_queries.py)."""

from __future__ import annotations

from aiohttp import web

from services.admin.routing import QueryParam, Route, add
from services.admin.web_io import db, json_response
from services.domain.usage_queries import (
    DIMENSIONS,
    MAX_VALUE_LENGTH,
    UsageQueryError,
    UsageReport,
    parse_usage_query,
    usage_report,
)
from services.infra.errors import ApiError
from services.infra.request_checks import Choice, Text, TimeOrAgo, Uuid


async def get_usage(request: web.Request) -> web.Response:
    try:
        query = parse_usage_query(request.query)
    except UsageQueryError as exc:
        raise ApiError.invalid_request(exc.message, param=exc.param) from None
    return json_response(await usage_report(db(request), query))


_DIMENSION = "(" + "|".join(DIMENSIONS) + ")"
GROUP_BY_PATTERN = f"^{_DIMENSION}(,{_DIMENSION})*$"

TAG = "usage"
ROUTES = (
    Route("GET", "/usage", get_usage, "Usage totals per hour or day, grouped as asked, and "
          "the period's total (the sum of the rows)", TAG,
          response=UsageReport, query=(
              QueryParam("start", "ISO-8601 time, or a duration ago (24h, 7d); default 7d "
                         "ago. Between 0001-01-02 and 9999-12-30, at most 366 days before "
                         "`end`", TimeOrAgo()),
              QueryParam("end", "ISO-8601 time, or a duration ago; default now; after "
                         "`start`", TimeOrAgo()),
              QueryParam("granularity", "hour or day", Choice(("hour", "day"), "day")),
              QueryParam("group_by", "what a row is per, besides its period: a comma-"
                         f"separated list of {', '.join(DIMENSIONS)} (default: all of "
                         "them); fields not grouped by are left out of the rows",
                         Text(max_length=200, pattern=GROUP_BY_PATTERN)),
              QueryParam("tenant_id", "only this tenant", Uuid()),
              QueryParam("environment_id", "only this environment", Uuid()),
              QueryParam("api_key_id", "only this key", Uuid()),
              QueryParam("model", "only this model", Text(max_length=MAX_VALUE_LENGTH)),
              QueryParam("region", "only usage served in this region (the node's region)",
                         Text(max_length=MAX_VALUE_LENGTH)))),
)


def add_routes(app: web.Application) -> None:
    add(app, ROUTES)
