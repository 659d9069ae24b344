"""`python -m services.<name>`: what every service's entry point does (the gateway adds its
workers and TLS to it). Read the settings from the environment (a `--port` over HTTP_PORT),
build the app, and serve it; settings that cannot work (or an app that refuses them) end the
process with a one-line reason and exit code 2, before anything is started."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from aiohttp import web

from services.infra.http import serve
from services.infra.logging import configure_logging
from services.infra.settings import CoreSettings, SettingsError, load_settings

S = TypeVar("S", bound=CoreSettings)

EXIT_REFUSED = 2


def service_main(name: str, description: str | None, settings_type: type[S],
                 build: Callable[[S], web.Application], argv: Sequence[str] | None = None, *,
                 refused: tuple[type[Exception], ...] = ()) -> int:
    """Run service `name`; `refused`: what `build` raises for settings it cannot work with,
    besides SettingsError."""
    parser = argparse.ArgumentParser(prog=name, description=description)
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: HTTP_PORT)")
    args = parser.parse_args(argv)
    expected: tuple[type[Exception], ...] = (SettingsError, *refused)
    try:
        settings = load_settings(settings_type, http_port=args.port)
        app = build(settings)
    except expected as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    configure_logging(settings.log_level, json=settings.log_json, service=name)
    serve(app, settings)
    return 0
