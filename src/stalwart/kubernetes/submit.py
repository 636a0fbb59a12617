"""Create a rendered manifest on a cluster through the official ``kubernetes`` client.

The client is imported here only, when something is submitted, so rendering needs neither the client
nor a cluster. Credentials come from the kubeconfig (``$KUBECONFIG`` or ``~/.kube/config``), else
from the service account when running inside a pod, exactly as ``kubectl`` finds them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from stalwart.kubernetes.manifests import API

__all__ = ["KubernetesConfigError", "Submission", "load_client_config", "plan", "submit"]

_INCLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class KubernetesConfigError(RuntimeError):
    """Neither a kubeconfig nor an in-cluster service account was found (or the client is missing)."""


@dataclass(frozen=True)
class Submission:
    """Where a manifest goes: the REST call ``submit`` makes for it."""

    kind: str  # pod | pytorchjob | trainjob
    group: str
    version: str
    plural: str
    namespace: str
    name: str
    body: dict

    @property
    def path(self) -> str:
        """The API server path the object is POSTed to."""
        prefix = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        return f"{prefix}/namespaces/{self.namespace}/{self.plural}"


def plan(manifest: dict, namespace: str | None = None) -> Submission:
    """The call that creates ``manifest``; ``namespace`` wins over the manifest's own (then ``default``)."""
    kinds = {(f"{g}/{v}" if g else v, k): key for key, (g, v, _, k) in API.items()}
    key = kinds.get((str(manifest.get("apiVersion")), str(manifest.get("kind"))))
    if key is None:
        known = ", ".join(f"{api} {kind}" for api, kind in kinds)
        raise ValueError(
            f"cannot submit apiVersion={manifest.get('apiVersion')!r} kind={manifest.get('kind')!r}; "
            f"known: {known}"
        )
    group, version, plural, _ = API[key]
    metadata = manifest.get("metadata") or {}
    namespace = namespace or metadata.get("namespace") or "default"
    body = {**manifest, "metadata": {**metadata, "namespace": namespace}}
    return Submission(key, group, version, plural, namespace, metadata.get("name", ""), body)


def load_client_config(kubeconfig: str | os.PathLike | None = None) -> str | None:
    """Configure the client from the kubeconfig, else in-cluster; return the context's namespace."""
    try:
        from kubernetes import config
    except ImportError:
        raise KubernetesConfigError(
            "the kubernetes client is not installed: pip install 'stalwart[kubernetes]'"
        ) from None
    path = os.fspath(kubeconfig) if kubeconfig else os.environ.get("KUBECONFIG") or None
    try:
        config.load_kube_config(config_file=path)
    except (config.ConfigException, OSError) as kube_error:
        try:
            config.load_incluster_config()
        except config.ConfigException as cluster_error:
            where = path or "~/.kube/config"
            raise KubernetesConfigError(
                f"no Kubernetes configuration: the kubeconfig {where} could not be loaded ({kube_error}) "
                f"and this is not a pod in a cluster ({cluster_error}); set KUBECONFIG or pass --kubeconfig"
            ) from None
        try:
            return _INCLUSTER_NAMESPACE.read_text().strip() or None
        except OSError:
            return None
    try:
        _, active = config.list_kube_config_contexts(config_file=path)
    except (config.ConfigException, OSError):
        return None
    return (active or {}).get("context", {}).get("namespace")


def submit(manifest: dict, *, namespace: str | None = None, kubeconfig: str | None = None) -> dict:
    """Create ``manifest`` on the cluster and return the object the API server sent back.

    The namespace is ``namespace``, else the manifest's, else the kubeconfig context's, else
    ``default``. API errors propagate as ``kubernetes.client.ApiException``.
    """
    context_namespace = load_client_config(kubeconfig)
    from kubernetes import client

    call = plan(manifest, namespace or (manifest.get("metadata") or {}).get("namespace") or context_namespace)
    if call.kind == "pod":
        # the client takes the manifest as a dict, though its annotations name V1Pod
        created = client.CoreV1Api().create_namespaced_pod(call.namespace, call.body)  # type: ignore[arg-type]
        return client.ApiClient().sanitize_for_serialization(created)
    return client.CustomObjectsApi().create_namespaced_custom_object(  # type: ignore[return-value]
        call.group, call.version, call.namespace, call.plural, call.body
    )
