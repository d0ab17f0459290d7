"""deploy/scheduler: the webhook configuration and Service are valid Kubernetes objects (Kubernetes' OpenAPI
schemas, strict), and both configurations point at routes the scheduler serves, with the settings that keep a
scheduler outage from blocking pods."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from libs.events.schedule import ScoreReply
from services.scheduler.http import SchedulerHttp

DEPLOY = Path(__file__).parent.parent.parent / "deploy" / "scheduler"
KUBERNETES = "1.37.0"
# k8s.io/kube-scheduler/config/v1 Extender and ExtenderTLSConfig: kubernetes-validate has no schema for the
# scheduler's component configuration, so its extender's fields are checked here.
EXTENDER_FIELDS = {"urlPrefix", "filterVerb", "preemptVerb", "prioritizeVerb", "weight", "bindVerb", "enableHTTPS",
                   "tlsConfig", "httpTimeout", "nodeCacheCapable", "managedResources", "ignorable"}
TLS_FIELDS = {"insecure", "serverName", "certFile", "keyFile", "caFile", "certData", "keyData", "caData"}


def documents(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]


def served_paths() -> set[str]:
    app = SchedulerHttp(lambda request: ScoreReply(), timeout=1.0).app()
    return {route.resource.canonical for route in app.router.routes() if route.resource is not None}


def test_webhook_manifests_are_valid_kubernetes_objects() -> None:
    docs = documents("webhook.yaml")
    assert [doc["kind"] for doc in docs] == ["MutatingWebhookConfiguration", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_webhook_never_blocks_a_pod_and_calls_a_served_route() -> None:
    configuration, service = documents("webhook.yaml")
    (webhook,) = configuration["webhooks"]
    assert webhook["failurePolicy"] == "Ignore" and webhook["sideEffects"] == "None"
    assert webhook["admissionReviewVersions"] == ["v1"]
    assert 1 <= webhook["timeoutSeconds"] <= 5
    assert webhook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                                 "resources": ["pods"], "scope": "Namespaced"}]
    client = webhook["clientConfig"]["service"]
    assert client["path"] in served_paths()
    assert (client["name"], client["namespace"]) == (service["metadata"]["name"], service["metadata"]["namespace"])
    assert client["port"] in [port["port"] for port in service["spec"]["ports"]]
    excluded = webhook["namespaceSelector"]["matchExpressions"][0]
    assert excluded["operator"] == "NotIn" and "kube-system" in excluded["values"]
    assert service["metadata"]["namespace"] in excluded["values"]  # the scheduler's own pods never wait on it


def test_the_extender_configuration_is_ignorable_and_calls_served_routes() -> None:
    (configuration,) = documents("kube-scheduler-config.yaml")
    assert configuration["apiVersion"] == "kubescheduler.config.k8s.io/v1"
    assert configuration["kind"] == "KubeSchedulerConfiguration"
    (extender,) = configuration["extenders"]
    assert set(extender) <= EXTENDER_FIELDS and set(extender["tlsConfig"]) <= TLS_FIELDS
    assert extender["urlPrefix"].startswith("https://") and extender["enableHTTPS"] is True
    assert {f"/{extender['filterVerb']}", f"/{extender['prioritizeVerb']}"} <= served_paths()
    assert extender["ignorable"] is True and extender["nodeCacheCapable"] is False
    assert isinstance(extender["weight"], int) and extender["weight"] > 0
    (_, service) = documents("webhook.yaml")
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{service['spec']['ports'][0]['port']}"
    assert extender["urlPrefix"] == f"https://{host}"
