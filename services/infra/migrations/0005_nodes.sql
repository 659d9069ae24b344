-- Projection `nodes`: every GPU node the control plane has heard of, built from node events.
-- The latest heartbeat lives in Redis (node:{id}:heartbeat); only state changes reach here.
CREATE TABLE nodes (
    id              uuid PRIMARY KEY,
    cluster_name    text NOT NULL,
    provider        text NOT NULL,
    region          text NOT NULL,
    instance_type   text NOT NULL,
    gpu_type        text NOT NULL,
    vram_total_gb   integer NOT NULL,
    model_name      text NOT NULL,
    endpoint_url    text NOT NULL,
    spot_instance   boolean NOT NULL,
    agent_version   text NOT NULL DEFAULT '',
    status          text NOT NULL,
    status_reason   text NOT NULL DEFAULT '',
    health_score    integer,
    spot_deadline   timestamptz,
    registered_at   timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    version         bigint NOT NULL
);
CREATE INDEX idx_nodes_status ON nodes (status) WHERE status = 'active';
CREATE INDEX nodes_model ON nodes (model_name);
