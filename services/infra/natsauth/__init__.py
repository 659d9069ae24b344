"""NATS's decentralized authentication, as the platform uses it.

An operator vouches for two accounts: SYS (the servers' own) and CROSSLOGIC (everything the
platform says). Every service, operator tool and GPU node is a user of CROSSLOGIC with its own
key and only the subjects it needs (`identities`). Nodes are issued by a *scoped* signing key:
their permissions live in the account's JWT, so the key that mints them at launch can mint
nothing else. JWTs are written without a JWT library, as NATS's ADR-14 describes (`jwt`).
"""
