"""`crosslogic models|deployments|nodes …`: the model catalog, where models are deployed
and the GPU nodes that serve them."""

from __future__ import annotations

import argparse
from typing import Any

from services.cli.admin_client import AdminClient
from services.cli.admin_format import DEPLOYMENT_COLUMNS, MODEL_COLUMNS, NODE_COLUMNS
from services.cli.admin_runner import AdminParsers, given

# --------------------------------------------------------------------------- models

WEIGHTS_HELP = ("where nodes load the weights from: hf://ORG/REPO, r2://BUCKET/PREFIX, or "
                "file:///PATH (local cloud only); default: the Hub repo of the model's name")


def _models_create(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.post("/models", {"name": a.name, "family": a.family, "vram_gb": a.vram_gb,
                              "input_price_per_million": a.input_price,
                              "output_price_per_million": a.output_price,
                              "context_length": a.context_length,
                              "weights_source": a.weights_source})


def _models_list(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.list_all("/models")


def _models_get(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.get(f"/models/{a.id}")


def _models_update(c: AdminClient, a: argparse.Namespace) -> Any:
    body = given(a, "family", "vram_gb", "context_length", "status", "weights_source")
    if a.input_price is not None:
        body["input_price_per_million"] = a.input_price
    if a.output_price is not None:
        body["output_price_per_million"] = a.output_price
    return c.patch(f"/models/{a.id}", body)


# --------------------------------------------------------------------------- deployments


def _deployments_create(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.post("/deployments", {"model": a.model, "regions": a.region,
                                   "gpu_type": a.gpu_type, "spot": a.spot,
                                   "min_nodes": a.min, "max_nodes": a.max,
                                   "allow_on_demand_fallback": not a.no_fallback})


def _deployments_list(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.list_all("/deployments")


def _deployments_get(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.get(f"/deployments/{a.id}")


def _deployments_update(c: AdminClient, a: argparse.Namespace) -> Any:
    body: dict[str, Any] = given(a, "gpu_type")
    if a.region:
        body["regions"] = a.region
    if a.min is not None:
        body["min_nodes"] = a.min
    if a.max is not None:
        body["max_nodes"] = a.max
    if a.spot is not None:
        body["spot"] = a.spot
    return c.patch(f"/deployments/{a.id}", body)


def _deployments_delete(c: AdminClient, a: argparse.Namespace) -> Any:
    c.delete(f"/deployments/{a.id}")
    if not a.json:
        print(f"deleted deployment {a.id}")


# --------------------------------------------------------------------------- nodes


def _nodes_list(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.list_all("/nodes")


def _nodes_get(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.get(f"/nodes/{a.id}")


def _nodes_drain(c: AdminClient, a: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"reason": a.reason}
    if a.deadline is not None:
        body["deadline_seconds"] = a.deadline
    return c.post(f"/nodes/{a.id}/drain", body)


def _nodes_terminate(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.post(f"/nodes/{a.id}/terminate", {"reason": a.reason})


def register_fleet_commands(parsers: AdminParsers) -> None:
    """Add `models`, `deployments` and `nodes`."""
    leaf, group = parsers.leaf, parsers.group
    g = group("models", "models of the catalog (admin API)")
    p = leaf(g, "create", "add a model", _models_create)
    p.add_argument("name")
    p.add_argument("--family", required=True)
    p.add_argument("--vram-gb", type=int, required=True)
    p.add_argument("--input-price", required=True, metavar="USD",
                   help="per million input tokens, e.g. 0.15")
    p.add_argument("--output-price", required=True, metavar="USD")
    p.add_argument("--context-length", type=int, required=True)
    p.add_argument("--weights-source", metavar="URI", help=WEIGHTS_HELP)
    leaf(g, "list", "list models", _models_list, MODEL_COLUMNS)
    leaf(g, "get", "show a model", _models_get).add_argument("id")
    p = leaf(g, "update", "change a model", _models_update)
    p.add_argument("id")
    p.add_argument("--family")
    p.add_argument("--vram-gb", type=int)
    p.add_argument("--input-price", metavar="USD")
    p.add_argument("--output-price", metavar="USD")
    p.add_argument("--context-length", type=int)
    p.add_argument("--status", choices=("active", "suspended", "deleted"))
    p.add_argument("--weights-source", metavar="URI", help=WEIGHTS_HELP)

    g = group("deployments", "model deployments (admin API)")
    p = leaf(g, "create", "deploy a model", _deployments_create)
    p.add_argument("--model", required=True, help="model name or id")
    p.add_argument("--region", action="append", required=True, help="repeatable")
    p.add_argument("--gpu-type", required=True)
    p.add_argument("--spot", action="store_true", help="use spot instances")
    p.add_argument("--min", type=int, required=True, metavar="N", help="fewest nodes")
    p.add_argument("--max", type=int, required=True, metavar="N", help="most nodes")
    p.add_argument("--no-fallback", action="store_true",
                   help="never fall back to on-demand when spot is short")
    leaf(g, "list", "list deployments", _deployments_list, DEPLOYMENT_COLUMNS)
    leaf(g, "get", "show a deployment", _deployments_get).add_argument("id")
    p = leaf(g, "update", "change a deployment", _deployments_update)
    p.add_argument("id")
    p.add_argument("--region", action="append", help="the new regions (repeatable)")
    p.add_argument("--gpu-type")
    p.add_argument("--spot", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--min", type=int, metavar="N")
    p.add_argument("--max", type=int, metavar="N")
    leaf(g, "delete", "delete a deployment", _deployments_delete).add_argument("id")

    g = group("nodes", "GPU nodes (admin API)")
    leaf(g, "list", "list nodes with their latest heartbeat", _nodes_list, NODE_COLUMNS)
    leaf(g, "get", "show a node", _nodes_get).add_argument("id")
    p = leaf(g, "drain", "ask a node's agent to drain and leave", _nodes_drain)
    p.add_argument("id")
    p.add_argument("--reason", default="drained by an operator")
    p.add_argument("--deadline", type=float, metavar="SECONDS",
                   help="how long in-flight requests may take")
    p = leaf(g, "terminate", "have the orchestrator drain a node and take its machine down",
             _nodes_terminate)
    p.add_argument("id")
    p.add_argument("--reason", default="terminated by an operator")
