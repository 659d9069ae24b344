-- Each node's own NATS credential (its public key and expiry, from node.launching): the
-- orchestrator revokes the credential of a node that has ended, until the credential expires.
ALTER TABLE nodes ADD COLUMN credential_key text NOT NULL DEFAULT '';
ALTER TABLE nodes ADD COLUMN credential_expires_at timestamptz;
CREATE INDEX nodes_credentials_to_revoke ON nodes (credential_expires_at)
    WHERE credential_key <> '' AND status IN ('terminated', 'failed');
