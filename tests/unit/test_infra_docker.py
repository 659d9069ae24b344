"""The platform image's Dockerfile and .dockerignore, read as text (no Docker engine here):
the base, a non-root numeric user, a health check on the service's port, the entrypoint that
reads secrets from files, and a build context that holds everything `pip install .` and the
image need. (The entrypoint itself runs in tests/unit/test_infra_settings.py.)"""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib

from tests.unit.test_infra_metric_names import ROOT

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def ignored(path: str) -> bool:
    """Docker's rule: a pattern matches a path or any folder above it; `!` takes a match
    back; the last pattern that matches decides."""
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    verdict = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!")
        if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            verdict = not negated
    return verdict


def copy_sources(args: str) -> list[str]:
    """The sources of a COPY (its --flags left out)."""
    words = [w for w in args.split() if not w.startswith("--")]
    return words[:-1]


def test_every_stage_is_python_3_11_slim() -> None:
    bases = [args.split()[0] for word, args in instructions() if word == "FROM"]
    assert bases and set(bases) == {"python:3.11-slim"}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"


def test_the_image_runs_as_a_numeric_non_root_user() -> None:
    users = [args for word, args in final_stage() if word == "USER"]
    assert users, "a USER in the final stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_the_health_check_asks_the_services_own_port() -> None:
    checks = [args for word, args in final_stage() if word == "HEALTHCHECK"]
    assert len(checks) == 1
    command = json.loads(checks[0][checks[0].index("CMD") + 3:].strip())
    code = command[command.index("-c") + 1]
    assert "HTTP_PORT" in code and "/health" in code
    compile(code, "healthcheck", "exec")  # it is Python that runs
    env = " ".join(args for word, args in final_stage() if word == "ENV")
    assert "HTTP_HOST=0.0.0.0" in env, "reachable from other containers"


def test_the_build_context_holds_what_the_install_needs() -> None:
    sources = [source for word, args in instructions()
               if word == "COPY" and not args.startswith("--from")
               for source in copy_sources(args)]
    assert "README.md" in sources and "pyproject.toml" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not ignored(source), f"{source} is in .dockerignore"
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for pattern in packages["packages"]["find"]["include"]:
        top = pattern.rstrip("*")
        assert any(line.startswith(f"COPY {top} ") for line in
                   (f"{w} {a}" for w, a in instructions())), f"{top}/ is copied"
    for heavy in (".venv", ".git", ".state", "tests", "infra/k8s/config.yaml", "infra/.env"):
        assert ignored(heavy), heavy


def test_the_ignore_rule_takes_exceptions_back() -> None:
    assert ignored("infra/prometheus/alerts.yml")
    assert not ignored("infra/docker/entrypoint.sh")
    assert not ignored("services/infra/bus.py")


def test_the_entrypoint_is_the_images_and_runs_the_command() -> None:
    entrypoints = [args for word, args in final_stage() if word == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    (script,) = json.loads(entrypoints[0])  # exec form: the command's signals reach it
    copies = [[*copy_sources(args), args.split()[-1]] for word, args in final_stage()
              if word == "COPY" and not args.startswith("--from")]
    assert ["infra/docker/entrypoint.sh", script] in copies
    text = (ROOT / "infra" / "docker" / "entrypoint.sh").read_text()
    assert text.startswith("#!/bin/sh\n")
    assert text.rstrip().endswith('exec "$@"'), "the command replaces the script (PID 1)"


def test_the_image_ships_pg_dump_16_for_backups() -> None:
    runs = " ".join(args for word, args in final_stage() if word == "RUN")
    assert "postgresql-client-16" in runs
    min_major = re.search(r"MIN_MAJOR = (\d+)",
                          (ROOT / "services" / "cli" / "backup.py").read_text())
    assert min_major is not None and int(min_major.group(1)) <= 16
