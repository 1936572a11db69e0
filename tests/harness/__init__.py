"""A real OCI registry (distribution 2.8), a token issuer and a counting proxy for tests."""
