"""A simulator of vLLM's OpenAI-compatible server (``vllm serve``) for dev runs, tests and
benchmarks where no GPU runs: same routes, JSON shapes, errors, streaming and metrics, with
deterministic output, GPU-like timing and injectable faults. See docs/simulator.md.

Errors use the shape of current vLLM, ``{"error": {"message", "type", "param", "code"}}``
(``ErrorResponse(error=ErrorInfo(...))`` in vllm/entrypoints/openai/engine/protocol.py, since
vLLM 0.10.1, PR #22099), not the older top-level
``{"object": "error", "message", "type", "param", "code"}`` of vLLM 0.10.0 and before.
"""

from agent.simulator.app import create_app
from agent.simulator.config import Faults, SimulatorConfig

__all__ = ["Faults", "SimulatorConfig", "create_app"]
