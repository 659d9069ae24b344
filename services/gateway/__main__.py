"""`python -m services.gateway [--workers N] [--port P] [--tls-cert PEM --tls-key PEM]` (also
`crosslogic serve gateway`).

With several workers, each is its own process listening on the same port (SO_REUSEPORT): the
kernel spreads connections over them. The parent only starts them, passes SIGTERM/SIGINT on,
and exits when they have all stopped.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from services.domain.pricing import parse_multipliers
from services.gateway.app import create_gateway_app
from services.gateway.settings import GatewaySettings
from services.infra.http import serve
from services.infra.logging import configure_logging
from services.infra.node_keys import check_secret
from services.infra.processes import die_with_parent
from services.infra.settings import SettingsError, load_settings
from services.infra.tls import TlsError, server_context


def _supervise(settings: GatewaySettings) -> int:
    env = {**os.environ, "WORKERS": "1", "HTTP_PORT": str(settings.http_port),
           "GATEWAY_REUSE_PORT": "1", "TLS_CERT_FILE": settings.tls_cert_file,
           "TLS_KEY_FILE": settings.tls_key_file}
    # Each worker counts only what it served: one metrics port each (METRICS_PORT + i), all
    # scraped; a shared /metrics would show whichever worker the kernel picked.
    # A supervisor killed with -9 must not leave workers serving on the port beside the next
    # one's: they die with it.
    children = [subprocess.Popen(
        [sys.executable, "-m", "services.gateway"],
        env={**env, "METRICS_PORT": str(settings.metrics_port + i if settings.metrics_port
                                        else 0)},
        preexec_fn=die_with_parent)
        for i in range(settings.workers)]

    def forward(signum: int, _: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    codes = [child.wait() for child in children]
    return max(codes, default=0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--tls-cert", default=None, metavar="PEM",
                        help="certificate chain: serve HTTPS (with --tls-key)")
    parser.add_argument("--tls-key", default=None, metavar="PEM")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(GatewaySettings, workers=args.workers, http_port=args.port,
                                 tls_cert_file=args.tls_cert, tls_key_file=args.tls_key)
        check_secret(settings.node_api_key_secret.reveal())  # no secret, no node served
        try:
            parse_multipliers(settings.region_multipliers)
        except ValueError as exc:
            raise SettingsError(f"REGION_MULTIPLIERS: {exc}") from None
        # Checked before any worker starts: a bad certificate is one clear error, at once.
        tls = server_context(settings.tls_cert_file, settings.tls_key_file) \
            if settings.tls_cert_file or settings.tls_key_file else None
    except (SettingsError, TlsError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    if settings.workers > 1:
        return _supervise(settings)
    configure_logging(settings.log_level, json=settings.log_json, service="gateway")
    serve(create_gateway_app(settings), settings,
          reuse_port=os.environ.get("GATEWAY_REUSE_PORT") == "1", ssl_context=tls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
