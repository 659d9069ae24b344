-- When a node entered its current status: the reconciler gives a node that registered but
-- never became active a deadline from its registration (a re-registration after an agent
-- restart counts afresh). Rebuilt from the log like the rest of the projection; rows from
-- before this migration take their last change as the best guess.
ALTER TABLE nodes ADD COLUMN status_since timestamptz;
UPDATE nodes SET status_since = updated_at;
