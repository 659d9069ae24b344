-- Spend budgets (issue 21), a catalog projection of budget.set / budget.cleared: at most
-- `amount` dollars per period for a tenant, an environment or an API key (`scope_id`: the id of
-- that tenant, environment or key; ids are unique across them). A cleared budget keeps its
-- row with `amount` NULL, so the stream's version carries on if it is set again.
CREATE TABLE budgets (
    scope_id    uuid PRIMARY KEY,
    scope       text NOT NULL CHECK (scope IN ('tenant', 'environment', 'key')),
    tenant_id   uuid NOT NULL,
    amount      numeric(24, 9),
    period      text NOT NULL CHECK (period IN ('day', 'month', 'days')),
    every_days  integer NOT NULL DEFAULT 1,
    anchor      timestamptz,
    updated_at  timestamptz NOT NULL,
    version     bigint NOT NULL
);
CREATE INDEX budgets_tenant ON budgets (tenant_id);
