"""Settings from the environment: defaults, one error listing every bad variable, secrets that never print."""

from __future__ import annotations

import re
from dataclasses import fields, replace
from pathlib import Path

import pytest

from libs.bus import AGENTS_TTL_SECONDS, login_user
from libs.config import (
    MAX_HEARTBEAT_SECONDS,
    AgentSettings,
    KubeSettings,
    NatsSettings,
    S3Settings,
    SchedulerSettings,
    Secret,
    ServiceSettings,
    Settings,
    SettingsError,
    describe_settings,
    load_settings,
)
from libs.redact import strip_userinfo
from services.runtime.domain import MISSED_BEATS

NATS_PASSWORD = "hunter2-nats-password"
S3_SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


def test_defaults_from_an_empty_environment() -> None:
    settings = load_settings({})
    assert settings == Settings()
    assert settings.nats.urls == ["nats://127.0.0.1:4222"]
    assert settings.nats.user == ""
    assert not settings.nats.password
    assert not settings.nats.token
    assert settings.nats.replicas == 1
    assert settings.s3.endpoint == ""
    assert settings.s3.region == "us-east-1"
    assert settings.s3.path_style is True
    assert not settings.s3.access_key_id
    assert not settings.s3.secret_access_key
    assert settings.service.log_level == "info"
    assert settings.service.log_format == "auto"
    assert settings.service.max_event_bytes == 256 * 1024
    assert settings.service.max_deliver == 5
    assert settings.service.list_page_size == 1000


def test_unrelated_variables_are_ignored() -> None:
    assert load_settings({"HOME": "/root", "PATH": "/usr/bin", "SHOAL_UNKNOWN": "x"}) == Settings()


def test_values_from_the_environment() -> None:
    settings = load_settings({
        "NATS_URL": "nats://a:4222",
        "NATS_USER": "shoal",
        "NATS_PASSWORD": NATS_PASSWORD,
        "SHOAL_STREAM_REPLICAS": "3",
        "SHOAL_S3_ENDPOINT": "http://127.0.0.1:8333",
        "SHOAL_S3_REGION": "eu-west-1",
        "SHOAL_S3_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "SHOAL_S3_SECRET_ACCESS_KEY": S3_SECRET,
        "SHOAL_LOG_LEVEL": "debug",
        "SHOAL_LOG_FORMAT": "json",
        "SHOAL_MAX_EVENT_BYTES": " 65536 ",
        "SHOAL_MAX_DELIVER": "7",
        "SHOAL_LIST_PAGE_SIZE": "500",
        "SHOAL_SYNC_RETRY_SECONDS": "2.5",
        "SHOAL_SYNC_PAGE_SECONDS": "30",
    })
    assert settings.nats.user == "shoal"
    assert settings.nats.password.reveal() == NATS_PASSWORD
    assert settings.nats.replicas == 3
    assert settings.s3.endpoint == "http://127.0.0.1:8333"
    assert settings.s3.region == "eu-west-1"
    assert settings.s3.access_key_id.reveal() == "AKIAEXAMPLE"
    assert settings.s3.secret_access_key.reveal() == S3_SECRET
    assert settings.service.log_level == "debug"
    assert settings.service.log_format == "json"
    assert settings.service.max_event_bytes == 65536
    assert settings.service.max_deliver == 7
    assert settings.service.list_page_size == 500
    assert settings.service.sync_retry_seconds == 2.5
    assert settings.service.sync_page_seconds == 30


# --- NATS_URL ---


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("nats://a:4222", ["nats://a:4222"]),
        ("nats://a:4222,nats://b:4222,nats://c:4222", ["nats://a:4222", "nats://b:4222", "nats://c:4222"]),
        (" nats://a:4222 , nats://b:4222 ", ["nats://a:4222", "nats://b:4222"]),
        ("nats://a:4222,,nats://b:4222,", ["nats://a:4222", "nats://b:4222"]),
    ],
)
def test_nats_url_is_comma_separated(raw: str, expected: list[str]) -> None:
    assert load_settings({"NATS_URL": raw}).nats.urls == expected


@pytest.mark.parametrize("raw", ["", " ", ",", " , , "])
def test_nats_url_needs_at_least_one_server(raw: str) -> None:
    with pytest.raises(SettingsError, match="NATS_URL"):
        load_settings({"NATS_URL": raw})


@pytest.mark.parametrize(("raw", "why"), [
    ("nats://[::1", "'nats://[::1' is not a server URL (Invalid IPv6 URL)"),
    ("nats://a:4222,nats://b:99999", "'nats://b:99999' is not a server URL (Port out of range 0-65535)"),
    ("nats://a:port", "'nats://a:port' is not a server URL"),
    ("nats://:4222", "'nats://:4222' names no host"),
    ("nats://cli:s3cret@[::1", "'nats://***@[::1' is not a server URL"),  # the password never shown
])
def test_a_nats_url_that_names_no_server_is_a_settings_error(raw: str, why: str) -> None:
    # nats-py raised it from inside connect: a service or the CLI ended in a traceback.
    with pytest.raises(SettingsError) as caught:
        load_settings({"NATS_URL": raw})
    assert f"NATS_URL: {why}" in str(caught.value) and "s3cret" not in str(caught.value)


@pytest.mark.parametrize(("raw", "url"), [
    ("nats://[::1]:4222", "nats://[::1]:4222"),
    ("tls://a:4443", "tls://a:4443"),
    # Without a scheme nats-py reads nats://: spelled so from here on.
    ("127.0.0.1:4222", "nats://127.0.0.1:4222"),
    ("localhost", "nats://localhost"),
])
def test_nats_urls_nats_py_takes_are_valid(raw: str, url: str) -> None:
    assert load_settings({"NATS_URL": raw}).nats.urls == [url]


def test_a_nats_url_without_a_scheme_keeps_its_password_hidden_and_its_user_named() -> None:
    """nats-py logs in with the user and password of ``cli:s3cret@host:4222``; every place that shows a URL hides
    them only in a URL with a scheme: the CLI's "cannot reach NATS at cli:s3cret@..." and each service's "starting"
    line showed the password. Read as nats-py reads it, the URL is shown hidden, and its user names the inbox."""
    nats = load_settings({"NATS_URL": "cli:s3cret@127.0.0.1:4222"}).nats
    assert nats.urls == ["nats://cli:s3cret@127.0.0.1:4222"]
    assert strip_userinfo(", ".join(nats.urls)) == "nats://***@127.0.0.1:4222"
    assert login_user(nats) == "cli"
    assert replace(nats, urls=["cli:s3cret@h:1"]).urls == ["nats://cli:s3cret@h:1"]  # the CLI's --nats


@pytest.mark.parametrize("password", ["s3cret/rest", "s3cret?rest", "s3cret#rest"])
def test_a_nats_password_read_as_the_port_is_never_quoted(password: str) -> None:
    """A '/', '?' or '#' ends the host part of a URL, so urlsplit reads what comes before it as the port, and its
    reason quoted it ("Port could not be cast to integer value as 's3cret'"): the password in the settings error."""
    with pytest.raises(SettingsError) as caught:
        load_settings({"NATS_URL": f"nats://cli:{password}@127.0.0.1:4222"})
    assert "s3cret" not in str(caught.value)
    assert ("NATS_URL: 'nats://***@127.0.0.1:4222' is not a server URL (Port could not be cast to integer value); "
            "a '/', '?' or '#' in a password must be percent-encoded") in str(caught.value)


# --- Booleans ---


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "True", "yes", "on", " on "])
def test_true_booleans(raw: str) -> None:
    assert load_settings({"SHOAL_S3_PATH_STYLE": raw}).s3.path_style is True


@pytest.mark.parametrize("raw", ["0", "false", "FALSE", "no", "off", "", " Off "])
def test_false_booleans(raw: str) -> None:
    assert load_settings({"SHOAL_S3_PATH_STYLE": raw}).s3.path_style is False


@pytest.mark.parametrize("raw", ["maybe", "2", "t", "y", "enabled"])
def test_invalid_boolean(raw: str) -> None:
    with pytest.raises(SettingsError, match="SHOAL_S3_PATH_STYLE") as caught:
        load_settings({"SHOAL_S3_PATH_STYLE": raw})
    assert "true or false" in str(caught.value)
    assert repr(raw) in str(caught.value)


# --- One error listing every bad variable ---


def test_one_error_lists_every_bad_variable() -> None:
    bad = {
        "SHOAL_STREAM_REPLICAS": "three",
        "SHOAL_S3_PATH_STYLE": "maybe",
        "SHOAL_MAX_EVENT_BYTES": "lots",
        "SHOAL_MAX_DELIVER": "0",
        "SHOAL_LIST_PAGE_SIZE": "5000",
        "SHOAL_LOG_LEVEL": "verbose",
        "SHOAL_LOG_FORMAT": "xml",
        "NATS_URL": "",
    }
    with pytest.raises(SettingsError) as caught:
        load_settings(bad)
    message = str(caught.value)
    for name in bad:
        assert name in message, f"{name} missing from: {message}"
    # One line per problem, so a person reads them all at once.
    assert len(message.splitlines()) == 1 + len(bad)


def test_error_shows_the_bad_value_of_plain_settings() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"SHOAL_MAX_DELIVER": "five", "SHOAL_LOG_LEVEL": "loud"})
    message = str(caught.value)
    assert "SHOAL_MAX_DELIVER='five'" in message
    assert "'loud'" in message


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("SHOAL_MAX_EVENT_BYTES", "0"),
        ("SHOAL_MAX_EVENT_BYTES", "-1"),
        ("SHOAL_MAX_DELIVER", "0"),
        ("SHOAL_LIST_PAGE_SIZE", "0"),
        ("SHOAL_LIST_PAGE_SIZE", "1001"),
        ("SHOAL_SYNC_RETRY_SECONDS", "0"),
        ("SHOAL_SYNC_PAGE_SECONDS", "0"),
        ("SHOAL_STREAM_REPLICAS", "1.5"),
        ("SHOAL_LOG_LEVEL", "INFO "),
        ("SHOAL_READAHEAD_BUDGET", "lots"),
        ("SHOAL_MEMORY_TIER_BUDGET", "4 gigs"),
        ("SHOAL_LOAD_CONCURRENCY", "0"),
        ("SHOAL_MOUNT_START_SECONDS", "0"),
        ("SHOAL_HEARTBEAT_SECONDS", "0"),
        ("SHOAL_HEARTBEAT_SECONDS", "30"),
        ("SHOAL_NODE_NAME", "node *"),
        ("SHOAL_NODE_NAME", "node.>"),
        ("SHOAL_REPLICA_NAME", "dataset.example.com"),
    ],
)
def test_out_of_range_values(name: str, raw: str) -> None:
    with pytest.raises(SettingsError, match=name):
        load_settings({name: raw})


def test_a_kubernetes_node_name_with_dots_is_the_node_name() -> None:
    # EKS names nodes ip-10-0-1-23.ec2.internal, and the DaemonSet passes spec.nodeName as it is.
    node = "ip-10-0-1-23.ec2.internal"
    assert load_settings({"SHOAL_NODE_NAME": node}).agent.node_name == node


def test_settings_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="invalid settings"):
        load_settings({"SHOAL_MAX_DELIVER": "x"})


def test_a_number_that_is_no_number_is_said_in_the_tables_words() -> None:
    """Not msgspec's "Expected `int`, got `str`": what the setting takes."""
    with pytest.raises(SettingsError) as caught:
        load_settings({"SHOAL_HTTP_PORT": "x", "SHOAL_MAX_DELIVER": "many", "SHOAL_HEARTBEAT_SECONDS": "soon"})
    said = str(caught.value)
    assert "SHOAL_HTTP_PORT='x': expected a whole number, or off" in said
    assert "SHOAL_MAX_DELIVER='many': expected a whole number" in said
    assert "SHOAL_HEARTBEAT_SECONDS='soon': expected a number" in said
    assert "Expected" not in said


# --- Secrets ---


def test_nats_user_without_password_is_an_error() -> None:
    with pytest.raises(SettingsError, match="NATS_PASSWORD"):
        load_settings({"NATS_USER": "shoal"})


def test_the_nats_password_may_come_from_a_file_read_once(tmp_path: Path) -> None:
    """A node's agent reads its own password from a file on its host (deploy/nats-secure): an environment variable
    from a Secret would be the same for every pod of the DaemonSet."""
    secret = tmp_path / "password"
    secret.write_text(NATS_PASSWORD + "\n")
    settings = load_settings({"NATS_USER": "agent-node-a", "NATS_PASSWORD_FILE": str(secret)})
    assert settings.nats.password.reveal() == NATS_PASSWORD
    for environ, reason in (
            ({"NATS_PASSWORD_FILE": str(tmp_path / "absent")}, "cannot read it (No such file or directory)"),
            ({"NATS_PASSWORD_FILE": str(tmp_path)}, "cannot read it (Is a directory)"),
            ({"NATS_PASSWORD_FILE": str(secret), "NATS_PASSWORD": NATS_PASSWORD}, "give one of them")):
        with pytest.raises(SettingsError, match=re.escape(reason)) as caught:
            load_settings({"NATS_USER": "agent-node-a", **environ})
        assert NATS_PASSWORD not in str(caught.value) and "required when NATS_USER" not in str(caught.value)
    secret.write_text("\n")
    with pytest.raises(SettingsError, match="the file is empty"):
        load_settings({"NATS_USER": "agent-node-a", "NATS_PASSWORD_FILE": str(secret)})


def test_secrets_never_in_the_error_message() -> None:
    environ = {
        "NATS_PASSWORD": NATS_PASSWORD,
        "NATS_TOKEN": "token-" + NATS_PASSWORD,
        "SHOAL_S3_ACCESS_KEY_ID": "AKIA-" + S3_SECRET,
        "SHOAL_S3_SECRET_ACCESS_KEY": S3_SECRET,
        "SHOAL_MAX_DELIVER": "not-a-number",
        "SHOAL_LOG_LEVEL": "shout",
    }
    with pytest.raises(SettingsError) as caught:
        load_settings(environ)
    message = str(caught.value)
    assert "SHOAL_MAX_DELIVER" in message
    assert NATS_PASSWORD not in message
    assert S3_SECRET not in message
    assert NATS_PASSWORD not in repr(caught.value)
    assert S3_SECRET not in repr(caught.value)


def test_secrets_never_in_the_repr_of_settings() -> None:
    settings = load_settings({
        "NATS_USER": "shoal",
        "NATS_PASSWORD": NATS_PASSWORD,
        "NATS_TOKEN": "token-" + NATS_PASSWORD,
        "SHOAL_S3_SECRET_ACCESS_KEY": S3_SECRET,
        "SHOAL_S3_ACCESS_KEY_ID": "AKIA-" + S3_SECRET,
    })
    for shown in (repr(settings), str(settings), repr(settings.nats), repr(settings.s3), f"{settings.s3}"):
        assert NATS_PASSWORD not in shown
        assert S3_SECRET not in shown
    assert "Secret('***')" in repr(settings.nats)
    assert settings.nats.password.reveal() == NATS_PASSWORD
    assert settings.s3.secret_access_key.reveal() == S3_SECRET


def test_secret_behaviour() -> None:
    secret = Secret(S3_SECRET)
    assert repr(secret) == str(secret) == f"{secret}" == "Secret('***')"
    assert repr(Secret("")) == "Secret('')"
    assert secret.reveal() == S3_SECRET
    assert bool(secret) is True
    assert bool(Secret("")) is False
    assert secret == Secret(S3_SECRET)
    assert secret != Secret("other")
    assert secret != S3_SECRET  # never equal to the plain string, so it is not compared by accident
    assert hash(secret) == hash(Secret(S3_SECRET))


# --- Documentation of the settings ---


def test_the_secret_mirror_is_a_namespace_and_a_name() -> None:
    assert load_settings({}).kube.secret_mirror_ref is None
    settings = load_settings({"SHOAL_KUBE_SECRET_MIRROR": "shoal-system/shoal-dataset-secrets"})
    assert settings.kube.secret_mirror_ref == ("shoal-system", "shoal-dataset-secrets")
    for bad in ("shoal-dataset-secrets", "shoal-system/", "/name", "a/b/c", "Shoal/x"):
        with pytest.raises(SettingsError, match="SHOAL_KUBE_SECRET_MIRROR"):
            load_settings({"SHOAL_KUBE_SECRET_MIRROR": bad})


def test_the_bridges_namespaces_are_namespace_names_each_given_once() -> None:
    assert load_settings({"SHOAL_KUBE_NAMESPACES": "ml, team-a"}).kube.namespaces == ["ml", "team-a"]
    with pytest.raises(SettingsError, match="given more than once: ml"):
        load_settings({"SHOAL_KUBE_NAMESPACES": "ml,team-a,ml"})
    with pytest.raises(SettingsError, match="not namespace names: 'ML', 'a/b'"):
        load_settings({"SHOAL_KUBE_NAMESPACES": "ML,ok,a/b"})


def test_the_agents_runtimes_are_each_namespace_slash_name() -> None:
    """A bare name (as kubectl takes one, with -n) or a dotted key matched no runtime: the agent served nothing and
    said nothing."""
    assert load_settings({"SHOAL_AGENT_RUNTIMES": "default/demo, team-a/data"}).agent.runtimes == [
        "default/demo", "team-a/data"]
    with pytest.raises(SettingsError, match=re.escape(
            "SHOAL_AGENT_RUNTIMES: not <namespace>/<name> of a runtime: 'demo', 'team-a.data', 'Team_A/data', "
            "'a/b/c' (e.g. default/demo)")):
        load_settings({"SHOAL_AGENT_RUNTIMES": "demo,team-a.data,ok/fine,Team_A/data,a/b/c"})


def test_every_setting_is_described() -> None:
    rows = describe_settings()
    names = [name for name, _, _ in rows]
    groups = (NatsSettings, S3Settings, ServiceSettings, AgentSettings, SchedulerSettings, KubeSettings)
    expected = [f.metadata["env"] for group in groups for f in fields(group)]
    assert names == expected
    assert len(set(names)) == len(names)
    assert all(doc for _, _, doc in rows)
    defaults = {name: default for name, default, _ in rows}
    assert defaults["NATS_URL"] == "nats://127.0.0.1:4222"
    assert defaults["SHOAL_S3_PATH_STYLE"] == "True"
    # A secret's default is shown masked, never as a value.
    assert defaults["NATS_PASSWORD"] == "Secret('')"


def test_local_roots_and_allow_other() -> None:
    assert load_settings({}).service.local_roots == []  # local:// refused until the operator lists folders
    assert load_settings({}).agent.allow_other is True
    settings = load_settings({"SHOAL_LOCAL_ROOTS": "/data, /mnt/nfs", "SHOAL_MOUNT_ALLOW_OTHER": "false"})
    assert settings.service.local_roots == ["/data", "/mnt/nfs"]
    assert settings.agent.allow_other is False
    with pytest.raises(SettingsError, match="SHOAL_LOCAL_ROOTS: 'data' must be an absolute path"):
        load_settings({"SHOAL_LOCAL_ROOTS": "data"})


@pytest.mark.parametrize("subdir", ["/x", "/agents/node-a/", "..", "../other", "node-a/../../x", "a/.."])
def test_the_cache_subdir_is_a_folder_below_each_tier_path(subdir: str) -> None:
    # An absolute SHOAL_CACHE_SUBDIR was taken as a folder below the tier by the mount process (it stripped the
    # '/') but as the absolute folder by the agent, which then never found a deleted dataset's blocks to free them;
    # '..' would leave the tier altogether. Both are refused at start-up, with the reason.
    with pytest.raises(SettingsError, match=f"SHOAL_CACHE_SUBDIR={subdir!r}: must be a relative path without '..'"):
        load_settings({"SHOAL_CACHE_SUBDIR": subdir})


@pytest.mark.parametrize("subdir", ["", "node-a", "agents/node-a/", "./node-a", "node..a"])
def test_a_relative_cache_subdir_is_taken(subdir: str) -> None:
    assert load_settings({"SHOAL_CACHE_SUBDIR": subdir}).agent.cache_subdir == subdir


def test_node_labels_are_key_value_pairs() -> None:
    settings = load_settings({"SHOAL_NODE_LABELS": "zone=a, region=eu-1,topology.kubernetes.io/zone=z"})
    assert settings.agent.labels == {"zone": "a", "region": "eu-1", "topology.kubernetes.io/zone": "z"}
    assert load_settings({}).agent.labels == {}
    with pytest.raises(SettingsError, match="SHOAL_NODE_LABELS"):
        load_settings({"SHOAL_NODE_LABELS": "zone"})


def test_scheduler_settings() -> None:
    defaults = load_settings({}).scheduler
    assert defaults.http_port is None  # no webhook until a deployment gives it a certificate
    assert (defaults.node_weight, defaults.zone_weight, defaults.region_weight) == (100, 50, 20)
    settings = load_settings({"SHOAL_SCHED_HTTP_PORT": "8443", "SHOAL_SCHED_WEIGHT_ZONE": "70",
                              "SHOAL_SCHED_TLS_CERT": "/tls/crt", "SHOAL_SCHED_TLS_KEY": "/tls/key"}).scheduler
    assert settings.http_port == 8443 and settings.zone_weight == 70 and settings.tls_key == "/tls/key"
    with pytest.raises(SettingsError) as raised:
        load_settings({"SHOAL_SCHED_TLS_CERT": "/tls/crt", "SHOAL_SCHED_WEIGHT_NODE": "-1",
                       "SHOAL_SCHED_HTTP_PORT": "70000", "SHOAL_SCHED_NODE_TIMEOUT": "0"})
    message = str(raised.value)
    for problem in ("SHOAL_SCHED_TLS_CERT and SHOAL_SCHED_TLS_KEY: give both or neither",
                    "SHOAL_SCHED_WEIGHT_NODE=-1: must be 0 or more", "SHOAL_SCHED_HTTP_PORT=70000",
                    "SHOAL_SCHED_NODE_TIMEOUT: must be positive"):
        assert problem in message
    limits = load_settings({"SHOAL_SCHED_EXTENDER_MAX_BYTES": str(64 * 1024 * 1024)}).scheduler
    assert (limits.webhook_max_bytes, limits.extender_max_bytes) == (8 * 1024 * 1024, 64 * 1024 * 1024)
    assert (limits.http_max_reading, limits.http_max_connections) == (8, 256)
    with pytest.raises(SettingsError, match="SHOAL_SCHED_HTTP_MAX_READING=0: must be at least 1"):
        load_settings({"SHOAL_SCHED_HTTP_MAX_READING": "0"})


def test_pvc_root() -> None:
    assert load_settings({}).service.pvc_root == ""  # pvc:// refused until the operator says where claims are
    assert load_settings({"SHOAL_PVC_ROOT": "/var/lib/shoal/claims"}).service.pvc_root == "/var/lib/shoal/claims"
    with pytest.raises(SettingsError, match="SHOAL_PVC_ROOT='claims': must be an absolute path"):
        load_settings({"SHOAL_PVC_ROOT": "claims"})


def test_nats_tls_files_that_do_not_exist_are_settings_errors(tmp_path: Path) -> None:
    """Each named, at start: before, a service ended in a FileNotFoundError traceback when it first connected, and the
    CLI said "cannot reach NATS ... is `make run` running?"."""
    ca = tmp_path / "ca.crt"
    ca.write_text("a CA")
    load_settings({"NATS_TLS_CA": str(ca)})
    with pytest.raises(SettingsError) as caught:
        load_settings({"NATS_TLS_CA": str(tmp_path / "gone.crt"), "NATS_TLS_KEY": str(ca)})
    assert f"NATS_TLS_CA='{tmp_path / 'gone.crt'}': no such file" in str(caught.value)
    assert "NATS_TLS_KEY: given without NATS_TLS_CERT" in str(caught.value)


def test_the_longest_heartbeat_interval_leaves_a_node_its_three_missed_beats_before_its_record_expires() -> None:
    """Beating every 30 s, the agents' record (TTL a minute) expired after one missed beat while the runtime service
    still counted the node fresh (three beats): its cache worker was replaced and the ring moved. Refused now."""
    assert MAX_HEARTBEAT_SECONDS * MISSED_BEATS <= AGENTS_TTL_SECONDS
    assert load_settings({"SHOAL_HEARTBEAT_SECONDS": "20"}).agent.heartbeat_seconds == 20.0
    with pytest.raises(SettingsError, match=r"SHOAL_HEARTBEAT_SECONDS=30: must be positive and at most 20"):
        load_settings({"SHOAL_HEARTBEAT_SECONDS": "30"})


def test_node_labels_refuse_a_repeated_key() -> None:
    # A dict kept the last value: zone=a,zone=b was zone=b, without a word.
    with pytest.raises(SettingsError, match=r"SHOAL_NODE_LABELS=.*'zone' given more than once"):
        load_settings({"SHOAL_NODE_LABELS": "zone=a,region=eu,zone=b"})


@pytest.mark.parametrize(("labels", "reason"), [
    ("=a", "label key '': the name must be 1 to 63"),
    ("my zone=a", "label key 'my zone': the name must be"),
    ("-zone=a", "label key '-zone': the name must be"),
    ("Example.COM/zone=a", "label key 'Example.COM/zone': the prefix before '/' must be a DNS subdomain"),
    ("/zone=a", "label key '/zone': the prefix"),
    ("example.com/=a", "label key 'example.com/': the name must be"),
    (f"{'k' * 64}=a", f"label key {'k' * 64!r}: the name must be 1 to 63"),
    ("zone=eu west", "label zone='eu west': a value must be empty or"),
    ("zone=a:b", "label zone='a:b': a value must be"),
    (f"zone={'v' * 64}", f"label zone={'v' * 64!r}: a value must be empty or at most 63"),
    ("zone=a.", "label zone='a.': a value must be"),
])
def test_node_labels_must_be_kubernetes_labels(labels: str, reason: str) -> None:
    with pytest.raises(SettingsError, match="SHOAL_NODE_LABELS: " + re.escape(reason)):
        load_settings({"SHOAL_NODE_LABELS": labels})


def test_node_labels_take_what_kubernetes_takes() -> None:
    labels = "topology.kubernetes.io/zone=eu-1a,Gpu_Model=A100.80G,empty=,x=1"
    assert load_settings({"SHOAL_NODE_LABELS": labels}).agent.labels == {
        "topology.kubernetes.io/zone": "eu-1a", "Gpu_Model": "A100.80G", "empty": "", "x": "1"}
