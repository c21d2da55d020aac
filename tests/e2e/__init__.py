"""End-to-end tests against a real Kubernetes API server (a package, so that its conftest is `e2e.conftest`
and never shadows tests/conftest.py, which other test modules import from)."""
