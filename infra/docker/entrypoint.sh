#!/bin/sh
# The platform image's entrypoint (Dockerfile): Docker's `_FILE` convention for the secrets the
# platform reads as text. With NAME_FILE set, NAME becomes that file's content, so a credential
# can come from a file (a compose volume or secret) instead of sitting in the container's
# configuration, where `docker inspect` shows it. Then the command runs in this process.
#
# Only the names listed here: other settings end in _FILE and mean a path (TLS_CERT_FILE).
# Kubernetes does not run it (a container's `command` replaces the entrypoint) and needs it
# not: there the environment comes from Secrets.
set -eu

for name in NATS_CREDS NATS_NODE_ISSUER; do
    eval "file=\${${name}_FILE:-}"
    [ -n "$file" ] || continue
    eval "already=\${${name}+set}"
    if [ -n "$already" ]; then
        # Two sources would leave the one that wins to chance: refuse both.
        echo "entrypoint: both $name and ${name}_FILE are set; set one" >&2
        exit 64
    fi
    if [ ! -r "$file" ]; then
        echo "entrypoint: ${name}_FILE=$file is not a readable file" >&2
        exit 66
    fi
    value=$(cat "$file")
    export "$name=$value"
    unset "${name}_FILE"
done

exec "$@"
