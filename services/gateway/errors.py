"""Moved to `services.infra.errors` (the admin API shares it); kept so old imports work."""

from services.infra.errors import (
    ERROR_TYPES,
    ApiError,
    api_error_for_http,
    error_kind,
    error_response,
    sse_error_event,
)

__all__ = ["ERROR_TYPES", "ApiError", "api_error_for_http", "error_kind", "error_response",
           "sse_error_event"]
