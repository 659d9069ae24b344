-- Projection `deployments`: which model runs where, on what GPUs, between how many nodes.
-- Same rules as the catalog (0003): `version` is the stream version last applied to the row,
-- so applying an event twice (inline by the command, again by the runner) is a no-op; no
-- foreign keys, so projections rebuild in any order. A deleted deployment keeps its row with
-- status 'deleted': the reconciler reads the tombstone to tear its nodes down.
CREATE TABLE deployments (
    id                        uuid PRIMARY KEY,
    model_id                  uuid NOT NULL,
    model_name                text NOT NULL,
    regions                   text[] NOT NULL,
    gpu_type                  text NOT NULL,
    spot                      boolean NOT NULL,
    min_nodes                 integer NOT NULL,
    max_nodes                 integer NOT NULL,
    allow_on_demand_fallback  boolean NOT NULL,
    status                    text NOT NULL,
    status_reason             text NOT NULL DEFAULT '',
    created_at                timestamptz NOT NULL,
    updated_at                timestamptz NOT NULL,
    deleted_at                timestamptz,
    version                   bigint NOT NULL
);
CREATE INDEX deployments_model ON deployments (model_id);
