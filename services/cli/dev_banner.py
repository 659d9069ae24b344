"""What `crosslogic dev` prints once the platform serves: where everything is and
ready-to-paste `curl`, `openai` and `crosslogic` lines, with the commands as the user
would type them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from services.cli.dev_demo import DEMO_MODEL, Demo
from services.cli.dev_urls import DevURLs


def python_command() -> str:
    """This interpreter as a user would type it: `.venv/bin/python` from the project folder
    (not resolved: the venv's python is a link to the system one, without the venv)."""
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


def cli_command() -> str:
    """`crosslogic` as a user can run it: the venv's script, which `make dev` does not put on
    the PATH."""
    script = Path(python_command()).parent / "crosslogic"
    return str(script) if script.parent != Path(".") and script.exists() else "crosslogic"


def banner(dev: DevURLs, demo: Demo, state: Path, problems: list[str] | None = None) -> str:
    python = python_command()
    cli = cli_command()
    heads_up = ""
    if problems:
        heads_up = ("\nHeads-up: the demo key cannot get a completion until you fix this "
                    "(or start over with --fresh):\n"
                    + "".join(f"  - {p}\n" for p in problems))
    install = ""
    if importlib.util.find_spec("openai") is None:
        install = f"  {python} -m pip install openai    # the SDK, once\n"
    return f"""
CrossLogic is running. Ctrl-C stops everything.

  gateway   {dev.gateway_url}      (OpenAI-compatible)
  admin     {dev.admin_url}/admin/v1   (X-Admin-Token: {demo.admin_token})
  console   {dev.admin_url}/console   (sign in with the admin token above)
  postgres  {dev.database_url}
  redis     {dev.redis_url}
  nats      {dev.nats_url}   (credentials: {state / 'nats' / 'auth' / 'creds'}/)
  logs      {state / 'logs'}/
{heads_up}
Try it:

  curl {dev.gateway_url}/v1/chat/completions \\
    -H "Authorization: Bearer {demo.api_key}" \\
    -H "Content-Type: application/json" \\
    -d '{{"model": "{DEMO_MODEL}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

{install}  {python} -c 'from openai import OpenAI
c = OpenAI(base_url="{dev.gateway_url}/v1", api_key="{demo.api_key}")
print(c.chat.completions.create(model="{DEMO_MODEL}",
      messages=[{{"role": "user", "content": "Hello!"}}]).choices[0].message.content)'

In another terminal (the CLI finds this platform by itself while it runs):
  {cli} events tail
  {cli} tenants list
"""
