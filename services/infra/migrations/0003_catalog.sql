-- The control-plane catalog, as projections of the log: tenants, environments, API keys, models.
-- `version` is the stream version of the last event applied to the row: a command applies its
-- event inline (read-your-writes) and the projection runner may apply it again; the guard
-- `WHERE version < new version` makes the second time a no-op. No foreign keys: projections
-- are rebuilt table by table, in any order.

CREATE TABLE tenants (
    id                 uuid PRIMARY KEY,
    name               text NOT NULL,
    email              text NOT NULL DEFAULT '',
    status             text NOT NULL,
    status_reason      text NOT NULL DEFAULT '',
    stripe_customer_id text,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    version            bigint NOT NULL
);

CREATE TABLE environments (
    id                  uuid PRIMARY KEY,
    tenant_id           uuid NOT NULL,
    name                text NOT NULL,
    region              text NOT NULL,
    status              text NOT NULL,
    requests_per_minute integer,
    tokens_per_minute   bigint,
    tokens_per_day      bigint,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    version             bigint NOT NULL
);
CREATE INDEX environments_tenant ON environments (tenant_id);

CREATE TABLE api_keys (
    id                  uuid PRIMARY KEY,
    key_hash            text NOT NULL UNIQUE,
    tenant_id           uuid NOT NULL,
    environment_id      uuid NOT NULL,
    name                text NOT NULL DEFAULT '',
    last_four           text NOT NULL,
    role                text NOT NULL,
    status              text NOT NULL,
    requests_per_minute integer,
    tokens_per_minute   bigint,
    tokens_per_day      bigint,
    concurrency         integer,
    expires_at          timestamptz,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    revoked_at          timestamptz,
    version             bigint NOT NULL
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);
CREATE INDEX api_keys_environment ON api_keys (environment_id);

CREATE TABLE models (
    id                        uuid PRIMARY KEY,
    name                      text NOT NULL UNIQUE,
    family                    text NOT NULL,
    vram_gb                   integer NOT NULL,
    input_price_per_million   numeric(20, 6) NOT NULL,
    output_price_per_million  numeric(20, 6) NOT NULL,
    context_length            integer NOT NULL,
    status                    text NOT NULL,
    created_at                timestamptz NOT NULL,
    updated_at                timestamptz NOT NULL,
    version                   bigint NOT NULL
);
