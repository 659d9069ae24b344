"""Judging a request by its checks' counters: whether it fits, what a budget grants, the
verdict, and OpenAI's `x-ratelimit-*` and `Retry-After` headers. Pure: time comes in as
milliseconds since the Unix epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from services.gateway.ratelimit.limits import (
    CONCURRENCY_RETRY_AFTER,
    Check,
    Kind,
    Layer,
    Verdict,
    window_reset_ms,
)


def fits(check: Check, used: int) -> bool:
    """Whether one more request fits. A request adds at least 1 to the comparison so that a
    zero-token estimate is still refused once the budget is spent (and a limit of 0 refuses
    everything). A budget fits when the least the request can run with does (`Check.least`)."""
    if check.limit is None:
        return True
    need = check.least if check.kind is Kind.MONEY and check.least else check.amount
    return used + max(need, 1) <= check.limit


def money_grant(checks: Sequence[Check], used: Sequence[int]) -> int:
    """The nano-dollars an admitted request holds at every budget: its worst case, or what is
    left of the tightest budget when that is less (never below `Check.least`: the request
    would not have fitted). What the ACQUIRE script computes, for the local limiter."""
    grant: int | None = None
    for check, u in zip(checks, used, strict=True):
        if check.kind is not Kind.MONEY:
            continue
        if grant is None:
            grant = check.amount
        if check.limit is not None:
            grant = min(grant, max(0, check.limit - u))
    return grant or 0


# --------------------------------------------------------------------------- verdict


def format_reset(seconds: float) -> str:
    """OpenAI's reset format, which is Go's `time.Duration` string at millisecond precision,
    rounded up: `20ms`, `1s`, `1.5s`, `6m0s`, `1h0m0s`; `0s` for nothing left to wait."""
    ms = max(0, math.ceil(round(seconds * 1000, 6)))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, frac = divmod(rest, 1000)
    secs = f"{whole}.{frac:03d}".rstrip("0") if frac else str(whole)
    out = f"{hours}h" if hours else ""
    if hours or minutes:
        out += f"{minutes}m"
    return f"{out}{secs}s"


def retry_after_header(seconds: float) -> str:
    """`Retry-After` is whole seconds; rounded up and at least 1 so clients never spin."""
    return str(max(1, math.ceil(round(seconds, 6))))


def retry_after_of(check: Check, now_ms: int) -> float:
    if check.kind is Kind.CONCURRENCY:
        return CONCURRENCY_RETRY_AFTER
    if check.kind is Kind.MONEY:
        return max(0, check.window_ms - now_ms) / 1000
    return window_reset_ms(now_ms, check.window_ms) / 1000


def verdict(checks: Sequence[Check], used: Sequence[int], now_ms: int, *,
            committed: bool | None = None) -> Verdict:
    """Judge a request from each check's usage *before* it (`used`, aligned with `checks`,
    already 0 for a stale window). `committed` is what the store did (the Lua script decides
    atomically); by default it is recomputed, which is what the local limiter does.

    When several layers refuse, the one that frees last is named: retrying before it resets
    is pointless."""
    if len(used) != len(checks):
        raise ValueError("one usage figure per check")
    failing = [i for i, (c, u) in enumerate(zip(checks, used, strict=True)) if not fits(c, u)]
    allowed = not failing if committed is None else committed
    layer: Layer | None = None
    retry_after = 0.0
    refused: Check | None = None
    if not allowed:
        candidates = failing or [i for i, c in enumerate(checks) if c.limit is not None][:1]
        if candidates:
            best = max(candidates, key=lambda i: (retry_after_of(checks[i], now_ms), -i))
            refused = checks[best]
            layer = refused.layer
            retry_after = retry_after_of(refused, now_ms)
    headers = rate_limit_headers(checks, used, now_ms, committed=allowed, refused=refused)
    if not allowed:
        if layer is not None:
            headers["x-ratelimit-scope"] = str(layer)
        headers["Retry-After"] = retry_after_header(retry_after)
    return Verdict(allowed=allowed, layer=layer, retry_after=retry_after, headers=headers)


def rate_limit_headers(checks: Sequence[Check], used: Sequence[int], now_ms: int, *,
                       committed: bool, refused: Check | None = None) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers for the most constraining request layer and token
    layer (remaining counted after this request when it was committed). When a layer of one
    kind refused, that kind's headers describe it, so they agree with `x-ratelimit-scope`."""
    # Runs on every request: one pass, few objects. The most constraining check of a kind has
    # the fewest remaining, then resets last (it binds longer), then comes first in the plan;
    # a check that refused is named whatever its standing.
    best: dict[Kind, tuple[tuple[int, int, int], Check, int, int]] = {}
    for i, c in enumerate(checks):
        limit = c.limit
        if limit is None or c.kind is Kind.CONCURRENCY or c.kind is Kind.MONEY:
            continue
        remaining = limit - (used[i] + c.amount if committed else used[i])
        if remaining < 0:
            remaining = 0
        window = c.window_ms
        reset = window - now_ms % window if window else 0
        rank = (-1, 0, 0) if c is refused else (remaining, -reset, i)
        held = best.get(c.kind)
        if held is None or rank < held[0]:
            best[c.kind] = (rank, c, remaining, reset)
    headers: dict[str, str] = {}
    for kind, suffix in ((Kind.REQUESTS, "requests"), (Kind.TOKENS, "tokens")):
        chosen = best.get(kind)
        if chosen is None:
            continue
        _, check, remaining, reset = chosen
        headers[f"x-ratelimit-limit-{suffix}"] = str(check.limit)
        headers[f"x-ratelimit-remaining-{suffix}"] = str(remaining)
        headers[f"x-ratelimit-reset-{suffix}"] = format_reset(reset / 1000)
    return headers


def unavailable(retry_after: float) -> Verdict:
    """Redis is unreachable and the policy is `deny`."""
    return Verdict(allowed=False, layer=Layer.UNAVAILABLE, retry_after=retry_after,
                   headers={"x-ratelimit-scope": str(Layer.UNAVAILABLE),
                            "Retry-After": retry_after_header(retry_after)})
