"""What ``shoal up`` prints once everything runs: where NATS, S3, the services and their side servers are, what
the manifest applied and where it mounts, and commands to look around; and the line it prints while it prepares.
Pure: text from what was started."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import msgspec

from libs import natsauth, subjects
from libs.cli.stack import S3Access
from libs.cli.stack.demo import DEMO_BUCKET, Applied
from libs.cli.stack.ports import DEFAULT_NATS_URL
from libs.embedded import LOOPBACK
from libs.redact import strip_userinfo


def publish_example(nats_url: str, secure: bool = False) -> str:
    """A copy-paste Python snippet that applies a Dataset with nothing but nats-py and JSON; ``secure``: as the CLI
    user, whose credentials and CA come from the environment its env file sets, and whose replies (JetStream's
    acknowledgement) arrive below its own inbox, the only one it may read."""
    from libs.events.common import ObjectMeta
    from libs.events.dataset import Dataset, DatasetApply, DatasetSpec, Mount

    command = DatasetApply(
        id="hello-1",
        dataset=Dataset(metadata=ObjectMeta(name="hello"),
                        spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{DEMO_BUCKET}/train/")])),
    )
    connect = f"{nats_url.split(',')[0]!r}"
    if secure:
        connect += (", user=os.environ['NATS_USER'], password=os.environ['NATS_PASSWORD'],\n"
                    "                            tls=ssl.create_default_context(cafile=os.environ['NATS_TLS_CA']),\n"
                    f"                            inbox_prefix={natsauth.inbox_prefix(natsauth.CLI)!r}")
    return (
        ".venv/bin/python - <<'EOF'\n"
        + ("import asyncio, json, os, ssl, nats\n" if secure else "import asyncio, json, nats\n")
        + "async def main():\n"
        f"    nc = await nats.connect({connect})\n"
        f"    command = {msgspec.to_builtins(command)!r}\n"
        f"    await nc.jetstream().publish({subjects.DATASET_APPLY!r}, json.dumps(command).encode())\n"
        "    await nc.close()\n"
        "asyncio.run(main())\n"
        "EOF"
    )


def provisioning_line(seeding: bool, documents: int) -> str:
    """The progress line before JetStream is provisioned and the manifest's ``documents`` applied."""
    return ("provisioning JetStream" + (", seeding the demo bucket" if seeding else "")
            + f" and applying {documents} document{'' if documents == 1 else 's'} of the manifest")


def applied_line(applied: Sequence[Applied], manifest: Path) -> str:
    if not applied:
        return f"nothing applied from {manifest} (it holds no Dataset or Runtime)"
    names = [f"{item.kind} {item.name!r}" + ("" if item.namespace == "default" else f" (namespace {item.namespace})")
             for item in applied]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed} applied from {manifest}"


def banner(*, pid: int, nats_url: str, nats_embedded: bool, nats_monitor_port: int, s3: S3Access,
           seeded_objects: int, services: Mapping[str, int], http_ports: Mapping[str, int], logs: Path,
           manifest: Path, applied: Sequence[Applied], mounts: Path,
           agents: Sequence[tuple[str, Path]] = (), metrics: str = "", nats_servers: int = 1,
           cli_env: Path | None = None, down: str = "shoal down", secrets: Path | None = None) -> str:
    """What ``shoal up`` prints once everything runs; ``agents`` (node, mount root) when it runs several;
    ``metrics``: where Prometheus is, or how to get one; ``nats_servers``: the embedded cluster's size;
    ``cli_env``: with ``--secure``, the file of the CLI's credentials, which every command to look around needs;
    ``down``: the ``shoal down`` that stops this one (``StateLayout.down_command``); ``secrets``: the folder of the
    secrets ``encryptOptions`` name."""
    # A NATS_URL may carry a user and password; the banner lands in terminals and logs, so it never shows them.
    nats_url = strip_userinfo(nats_url)
    nats_line = (f"{nats_url} (embedded; monitoring http://{LOOPBACK}:{nats_monitor_port})" if nats_embedded
                 else f"{nats_url} (from NATS_URL)")
    if nats_embedded and nats_servers > 1:
        nats_line = (f"{nats_url} (embedded JetStream cluster of {nats_servers}, streams and buckets with "
                     f"{nats_servers} replicas; monitoring http://{LOOPBACK}:{nats_monitor_port}.."
                     f"{nats_monitor_port + nats_servers - 1})")
    if s3.embedded:
        s3_line = (f"{s3.endpoint} (embedded SeaweedFS; access key {s3.access_key_id!r}, secret "
                   f"{s3.secret_access_key!r}; bucket {DEMO_BUCKET!r} with {seeded_objects} demo objects)")
    else:
        s3_line = (f"{s3.endpoint} (from SHOAL_S3_ENDPOINT; credentials from SHOAL_S3_ACCESS_KEY_ID/"
                   f"SHOAL_S3_SECRET_ACCESS_KEY; the demo Dataset expects a bucket {DEMO_BUCKET!r} there)")
    # The CLI's default server is NATS's default; anything else has to be named on its command line.
    shoal = ".venv/bin/shoal" if nats_url == DEFAULT_NATS_URL else f".venv/bin/shoal --nats {nats_url}"
    running = ", ".join(f"{name} (PID {service_pid})" for name, service_pid in services.items())
    sides = ", ".join(f"{name} http://{LOOPBACK}:{port}" for name, port in http_ports.items())
    datasets = [item for item in applied if item.kind == "Dataset"]
    lines = [
        f"Shoal is up (PID {pid}).",
        f"  NATS      {nats_line}",
        f"  S3        {s3_line}",
        f"  services  {running}",
        f"  health    {sides} (/healthz, /readyz, /metrics; mount processes log their own)",
        *([f"  metrics   {metrics}"] if metrics else []),
        f"  logs      {logs}/",
        *([f"  secrets   {secrets}/ (a Dataset's encryptOptions read <namespace>/<secret name>/<key> files there)"]
          if secrets is not None else []),
        f"  applied   {applied_line(applied, manifest)}",
    ]
    if agents:
        lines.append(f"  agents    {', '.join(node for node, _ in agents)} (each mounts every dataset it serves; "
                     "`shoal describe runtime` shows which hold the cache)")
    roots = [root for _, root in agents] or [mounts]
    for item in datasets:
        for root in roots:
            lines.append(f"  mount     {root}/{item.namespace}/{item.name} "
                         "(the agent mounts it once the dataset is Bound)")
    if cli_env is None:
        lines += ["", "Look around:"]
    else:  # without a user and the CA, every command below is refused
        lines += ["", "Look around (NATS wants TLS and a user: first give this shell the shoal CLI's):",
                  f"  . {cli_env}"]
    lines += [f"  {shoal} get datasets"]
    if datasets:
        first = datasets[0]
        where = f"{roots[0]}/{first.namespace}/{first.name}"
        namespace = "" if first.namespace == "default" else f" -n {first.namespace}"
        lines += [f"  {shoal} describe dataset {first.name}{namespace}",
                  f"  find {where} && md5sum $(find {where} -type f)"]
    lines += [
        "  Publish a command as JSON with plain Python (nats-py); paste this into a shell:",
        publish_example(nats_url, secure=cli_env is not None),
        "",
        f"Ctrl-C to stop (or `{down}` from another terminal).",
    ]
    return "\n".join(lines)
