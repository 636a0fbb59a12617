"""Kubernetes manifests for stalwart tasks (pure dicts; the kubernetes client is imported only to submit)."""
