"""What a container's command runs, and which environment variables that program reads.

Shared by the docker-compose and Kubernetes tests (tests/unit/test_infra_compose.py,
tests/unit/test_infra_k8s.py): a command naming a service that does not exist, or a variable
no settings class has (a typo, a setting renamed since), would start a container that ignores
its configuration without a word.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from agent.settings import AgentSettings
from services.cli.main import SERVICES, build_parser
from services.infra.relay import RelaySettings
from services.infra.settings import CoreSettings, load_settings
from tests.unit.test_infra_metric_names import ROOT

# Variables the `crosslogic` CLI itself reads (an operator runs it inside any platform
# container; `crosslogic nats setup` runs as a one-shot container): checked against the CLI's
# source below.
CLI_ENV = frozenset({"DATABASE_URL", "CROSSLOGIC_ADMIN_URL", "CROSSLOGIC_ADMIN_TOKEN",
                     "CROSSLOGIC_STATE_DIR", "NATS_URL", "NATS_CREDS", "NATS_STREAM_REPLICAS",
                     "NATS_AUTH_DIR"})

# `crosslogic backup --to` / `restore s3://…`: the storage's endpoint and R2 credentials (read
# by services/cli/offsite.py), and what boto3 itself reads.
BACKUP_ENV = frozenset({"BACKUP_S3_ENDPOINT_URL", "R2_ACCOUNT_ID", "R2_ACCESS_KEY_ID",
                        "R2_SECRET_ACCESS_KEY"})
BOTO3_ENV = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                       "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3"})

SIMULATOR_MAIN = ROOT / "agent" / "simulator" / "__main__.py"
ENTRYPOINT = ROOT / "infra" / "docker" / "entrypoint.sh"


def file_variables() -> frozenset[str]:
    """The variables the image's entrypoint reads from files: NAME_FILE → NAME."""
    match = re.search(r"^for name in ([A-Z_ ]+); do$", ENTRYPOINT.read_text(), re.MULTILINE)
    assert match is not None, "the entrypoint's list of variables"
    return frozenset(match.group(1).split())


def through_entrypoint(env: Mapping[str, str]) -> dict[str, str]:
    """The environment the program sees after the image's entrypoint: each NAME_FILE it
    handles becomes NAME (the value stands for the file's content); any other stays."""
    seen = {}
    for key, value in env.items():
        name = key.removesuffix("_FILE")
        if key.endswith("_FILE") and name in file_variables():
            assert name not in env, f"both {name} and {key}: the entrypoint refuses"
            seen[name] = f"content of {value}"
        else:
            seen[key] = value
    return seen


@dataclass(frozen=True)
class Program:
    name: str
    settings: type[msgspec.Struct] | None
    """Its settings class, read with load_settings; None: it reads only `extra`."""
    extra: frozenset[str] = frozenset()

    def variables(self) -> frozenset[str]:
        fields = self.settings.__struct_fields__ if self.settings is not None else ()
        return frozenset(f.upper() for f in fields) | self.extra

    def check(self, env: Mapping[str, str]) -> None:
        """Each variable is one the program reads, and the values parse."""
        unknown = set(env) - self.variables()
        assert not unknown, f"{self.name} reads no {sorted(unknown)}"
        if self.settings is not None:
            load_settings(self.settings, environ=env)  # SettingsError names a bad value


def service_settings(service: str) -> type[CoreSettings]:
    """The CoreSettings subclass that services/<service>/settings.py declares."""
    module = importlib.import_module(f"services.{service}.settings")
    found = [v for v in vars(module).values() if isinstance(v, type)
             and issubclass(v, CoreSettings) and v is not CoreSettings
             and v.__module__ == module.__name__]
    assert len(found) == 1, f"services/{service}/settings.py: {found}"
    return found[0]


def simulator_variables() -> frozenset[str]:
    return frozenset(re.findall(r'"(SIM_[A-Z0-9_]+)"', SIMULATOR_MAIN.read_text()))


def program_of(argv: Sequence[str]) -> Program:
    """The program a container command starts. Fails the test for one that does not exist."""
    argv = list(argv)
    if argv[:1] == ["crosslogic"]:
        try:
            args = build_parser().parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"`{' '.join(argv)}` is not a crosslogic command")
        if args.command == "serve":
            return Program(f"crosslogic serve {args.service}",
                           service_settings(args.service), CLI_ENV)
        if args.command == "relay":
            return Program("crosslogic relay", RelaySettings, CLI_ENV)
        if args.command in ("backup", "restore"):
            return Program(f"crosslogic {args.command}", None, CLI_ENV | BACKUP_ENV | BOTO3_ENV)
        return Program(f"crosslogic {args.command}", None, CLI_ENV)
    if argv[:2] == ["python", "-m"] and len(argv) > 2:
        module = argv[2]
        assert importlib.util.find_spec(module) is not None, f"no module {module}"
        if module == "agent":
            return Program("agent", AgentSettings)
        if module == "agent.simulator":
            return Program("simulator", None, simulator_variables())
        if module == "agent.local_cloud":
            # Its machines' agents and simulators inherit its environment: theirs, then.
            return Program("local cloud", None, simulator_variables() | frozenset(
                f.upper() for f in AgentSettings.__struct_fields__))
        match = re.fullmatch(r"services\.(\w+)", module)
        if match and f"services.{match.group(1)}.__main__" in SERVICES.values():
            return Program(module, service_settings(match.group(1)), CLI_ENV)
        pytest.fail(f"`{' '.join(argv)}`: not a program of the platform")
    pytest.fail(f"`{' '.join(argv)}`: not a program of the platform")


# --------------------------------------------------------------------------- the helpers' tests


def test_cli_variables_are_read_by_the_cli() -> None:
    source = "".join(p.read_text() for p in (ROOT / "services" / "cli").glob("*.py"))
    for name in CLI_ENV | BACKUP_ENV:
        assert f'"{name}"' in source, name


def test_every_service_has_its_settings() -> None:
    for service in SERVICES:
        assert "HTTP_PORT" in program_of(["crosslogic", "serve", service]).variables()
    assert "RELAY_BATCH_SIZE" in program_of(["crosslogic", "relay"]).variables()
    assert "VLLM_URL" in program_of(["python", "-m", "agent"]).variables()
    assert "SIM_TTFT" in program_of(["python", "-m", "agent.simulator"]).variables()
    assert "WORKERS" in program_of(["python", "-m", "services.gateway"]).variables()


def test_a_misspelt_variable_or_a_bad_value_is_caught() -> None:
    gateway = program_of(["crosslogic", "serve", "gateway"])
    gateway.check({"HTTP_PORT": "8080", "DATABASE_URL": "postgresql://x@y/z"})
    with pytest.raises(AssertionError, match="HTTP_PROT"):
        gateway.check({"HTTP_PROT": "8080"})
    with pytest.raises(ValueError, match="HTTP_PORT"):
        gateway.check({"HTTP_PORT": "eighty"})


def test_the_entrypoint_turns_files_into_variables() -> None:
    assert {"NATS_CREDS", "NATS_NODE_ISSUER"} <= file_variables()
    # A path setting that ends in _FILE is left alone.
    assert through_entrypoint({"NATS_CREDS_FILE": "/run/x", "TLS_CERT_FILE": "/tls.crt"}) == \
        {"NATS_CREDS": "content of /run/x", "TLS_CERT_FILE": "/tls.crt"}
    with pytest.raises(AssertionError, match="both"):
        through_entrypoint({"NATS_CREDS_FILE": "/run/x", "NATS_CREDS": "text"})


def run_entrypoint(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(ENTRYPOINT), *argv], env={"PATH": "/usr/bin:/bin", **env},
                          capture_output=True, text=True, timeout=30, check=False)


def test_the_entrypoint_runs_the_command_with_the_files_content(tmp_path: Path) -> None:
    """The script itself, under sh: a credential's lines arrive whole, the _FILE variable is
    gone, and a missing file or a second source stops the container before it starts."""
    creds = tmp_path / "nats.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\neyJ0\n------END NATS USER JWT------\n")
    shown = run_entrypoint({"NATS_CREDS_FILE": str(creds)}, "sh", "-c",
                           'printf "%s|%s" "$NATS_CREDS" "${NATS_CREDS_FILE-unset}"')
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == creds.read_text().rstrip("\n") + "|unset"
    missing = run_entrypoint({"NATS_CREDS_FILE": str(tmp_path / "none")}, "true")
    assert missing.returncode != 0 and "NATS_CREDS_FILE" in missing.stderr
    both = run_entrypoint({"NATS_CREDS_FILE": str(creds), "NATS_CREDS": "x"}, "true")
    assert both.returncode != 0 and "both" in both.stderr
    plain = run_entrypoint({"TLS_CERT_FILE": str(creds)}, "sh", "-c",
                           'printf "%s" "$TLS_CERT_FILE"')
    assert plain.stdout == str(creds)


@pytest.mark.parametrize("argv", [["crosslogic", "serve", "billingg"], ["crosslogic", "relai"],
                                  ["python", "-m", "services.nothing"], ["sh", "-c", "true"]])
def test_a_program_that_does_not_exist_is_caught(argv: list[str]) -> None:
    with pytest.raises((pytest.fail.Exception, AssertionError)):
        program_of(argv)
