-- Nodes the orchestrator launches exist before they register: a launching row carries the
-- deployment it belongs to and the deadline for its registration.
ALTER TABLE nodes
    ADD COLUMN deployment_id uuid,
    ADD COLUMN launch_deadline timestamptz,
    ADD COLUMN terminate_requested_at timestamptz,
    ADD COLUMN terminate_reason text NOT NULL DEFAULT '',
    ALTER COLUMN instance_type SET DEFAULT '',
    ALTER COLUMN vram_total_gb SET DEFAULT 0,
    ALTER COLUMN endpoint_url SET DEFAULT '';
CREATE INDEX nodes_deployment ON nodes (deployment_id) WHERE deployment_id IS NOT NULL;
