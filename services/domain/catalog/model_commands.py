"""Catalog commands on models and their deployments (which model runs where, on what, between
how many nodes)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from decimal import Decimal

import asyncpg

from schemas.events import (
    DeploymentCreated,
    DeploymentDeleted,
    DeploymentUpdated,
    EntityStatus,
    ModelCreated,
    ModelUpdated,
)
from schemas.ids import uuid7
from services.domain.catalog.command_base import CatalogCommandBase
from services.domain.catalog.errors import Conflict, Invalid, NotFound
from services.domain.catalog.weights import InvalidWeightsSource, parse_weights_source
from services.infra.db import Connection
from services.infra.eventlog import NO_STREAM


def check_node_bounds(min_nodes: int, max_nodes: int) -> None:
    if min_nodes < 0:
        raise Invalid("min_nodes must be 0 or more", "min_nodes")
    if max_nodes < min_nodes:
        raise Invalid(f"max_nodes ({max_nodes}) must be at least min_nodes ({min_nodes})",
                      "max_nodes")


class ModelCommands(CatalogCommandBase):
    # ------------------------------------------------------------------ models

    async def create_model(self, name: str, *, family: str, vram_gb: int,
                           input_price_per_million: Decimal, output_price_per_million: Decimal,
                           context_length: int,
                           weights_source: str | None = None) -> uuid.UUID:
        """`weights_source`: see services/domain/catalog/weights.py; stored in its canonical
        form. None: the Hugging Face Hub repo of `name`."""
        event = ModelCreated(model_id=uuid7(), name=name, family=family, vram_gb=vram_gb,
                             input_price_per_million=input_price_per_million,
                             output_price_per_million=output_price_per_million,
                             context_length=context_length,
                             weights_source=_weights_source(weights_source))
        async with self.log.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval("SELECT 1 FROM models WHERE name = $1", name):
                raise Conflict(f"model {name!r} already exists")
            await self._write(conn, event.stream, [event], NO_STREAM)
        return event.model_id

    async def update_model(self, model_id: uuid.UUID, *, family: str | None = None,
                           vram_gb: int | None = None,
                           input_price_per_million: Decimal | None = None,
                           output_price_per_million: Decimal | None = None,
                           context_length: int | None = None,
                           status: EntityStatus | None = None,
                           weights_source: str | None = None) -> None:
        """None leaves a field as it is. A model's source can be changed, not removed: set
        hf://<org>/<repo> to go back to the Hub. Nodes already up keep the weights they
        loaded; the next launch uses the new source."""
        source = _weights_source(weights_source)
        async with self.log.pool.acquire() as conn, conn.transaction():
            version = await self._version(conn, "models", model_id)
            event = ModelUpdated(model_id=model_id, family=family, vram_gb=vram_gb,
                                 input_price_per_million=input_price_per_million,
                                 output_price_per_million=output_price_per_million,
                                 context_length=context_length, status=status,
                                 weights_source=source)
            if all(getattr(event, f) is None for f in _MODEL_CHANGES):
                return
            await self._write(conn, event.stream, [event], version)

    # ------------------------------------------------------------------ deployments

    async def create_deployment(self, model: str | uuid.UUID, *, regions: Sequence[str],
                                gpu_type: str, spot: bool, min_nodes: int, max_nodes: int,
                                allow_on_demand_fallback: bool = True) -> uuid.UUID:
        """`model` is the model's id or its name; it must be in the catalog and not deleted."""
        if not regions:
            raise Invalid("a deployment needs at least one region", "regions")
        check_node_bounds(min_nodes, max_nodes)
        async with self.log.pool.acquire() as conn, conn.transaction():
            row = await _find_model(conn, model)
            if row is None:
                raise NotFound(f"model {model} not found")
            if row["status"] == EntityStatus.DELETED:
                raise Conflict(f"model {row['name']!r} is deleted")
            event = DeploymentCreated(deployment_id=uuid7(), model_id=row["id"],
                                      model_name=row["name"], regions=list(regions),
                                      gpu_type=gpu_type, spot=spot, min_nodes=min_nodes,
                                      max_nodes=max_nodes,
                                      allow_on_demand_fallback=allow_on_demand_fallback)
            await self._write(conn, event.stream, [event], NO_STREAM)
        return event.deployment_id

    async def update_deployment(self, deployment_id: uuid.UUID, *,
                                regions: Sequence[str] | None = None,
                                gpu_type: str | None = None, spot: bool | None = None,
                                min_nodes: int | None = None, max_nodes: int | None = None,
                                allow_on_demand_fallback: bool | None = None) -> None:
        if regions is not None and not regions:
            raise Invalid("a deployment needs at least one region", "regions")
        async with self.log.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT status, min_nodes, max_nodes, version FROM deployments WHERE id = $1",
                deployment_id)
            if row is None:
                raise NotFound(f"deployment {deployment_id} not found")
            if row["status"] == EntityStatus.DELETED:
                raise Conflict(f"deployment {deployment_id} is deleted")
            # The bounds are checked as they will be after the change, not field by field.
            check_node_bounds(row["min_nodes"] if min_nodes is None else min_nodes,
                              row["max_nodes"] if max_nodes is None else max_nodes)
            event = DeploymentUpdated(deployment_id=deployment_id,
                                      regions=None if regions is None else list(regions),
                                      gpu_type=gpu_type, spot=spot, min_nodes=min_nodes,
                                      max_nodes=max_nodes,
                                      allow_on_demand_fallback=allow_on_demand_fallback)
            if all(getattr(event, f) is None for f in _DEPLOYMENT_CHANGES):
                return
            await self._write(conn, event.stream, [event], row["version"])

    async def delete_deployment(self, deployment_id: uuid.UUID, reason: str = "") -> None:
        """Idempotent: deleting a deleted deployment changes nothing."""
        async with self.log.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT status, version FROM deployments WHERE id = $1",
                                      deployment_id)
            if row is None:
                raise NotFound(f"deployment {deployment_id} not found")
            if row["status"] == EntityStatus.DELETED:
                return
            event = DeploymentDeleted(deployment_id=deployment_id, reason=reason)
            await self._write(conn, event.stream, [event], row["version"])


_MODEL_CHANGES = ("family", "vram_gb", "input_price_per_million", "output_price_per_million",
                  "context_length", "status", "weights_source")
_DEPLOYMENT_CHANGES = ("regions", "gpu_type", "spot", "min_nodes", "max_nodes",
                       "allow_on_demand_fallback")


def _weights_source(text: str | None) -> str | None:
    """The canonical form of a source, so that one source is one string in the log."""
    if text is None:
        return None
    try:
        return str(parse_weights_source(text))
    except InvalidWeightsSource as exc:
        raise Invalid(f"weights_source {exc}", "weights_source") from None


async def _find_model(conn: Connection, model: str | uuid.UUID) -> asyncpg.Record | None:
    """By id when `model` is (or reads as) a UUID, else by name."""
    model_id: uuid.UUID | None = model if isinstance(model, uuid.UUID) else None
    if model_id is None:
        try:
            model_id = uuid.UUID(str(model))
        except ValueError:
            model_id = None
    if model_id is not None:
        row = await conn.fetchrow("SELECT id, name, status FROM models WHERE id = $1", model_id)
        if row is not None:
            return row
    return await conn.fetchrow("SELECT id, name, status FROM models WHERE name = $1",
                               str(model))
