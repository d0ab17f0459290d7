"""A NATS server with users and TLS on one machine: its certificates, its users' passwords, its config lines.

``shoal up --secure`` and the tests use it; ``deploy/`` has its own (Secrets, cert-manager). I/O: files below one
folder (``<state-dir>/nats-secure`` for ``shoal up``), made once and kept, so a restarted stack and the clients
configured from it stay valid; everything secret is 0600. Certificates come from the ``openssl`` command line (a CA,
and a server certificate for 127.0.0.1 and localhost signed by it). Which user may do what is ``libs.natsauth``'s.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from libs import natsauth
from libs.embedded import ROUTE_USER, NatsConfig

# 128 bits of randomness per password: guessing is hopeless, and it stays short enough to paste.
PASSWORD_BYTES = 16
# A local stack's certificates outlive any run of it; a year, then `rm -r <state-dir>/nats-secure` renews them.
CERT_DAYS = 365
# Seconds nats-server gives a client to finish the TLS handshake (its default, 0.5 s, is tight on a busy laptop).
TLS_HANDSHAKE_SECONDS = 5


class SecureSetupError(Exception):
    """The certificates or passwords could not be made (no openssl, an unwritable folder)."""


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class SecureNats:
    """Everything a secured local NATS needs: certificates, and a password per user (user name → password)."""

    folder: Path
    tls: TlsFiles
    passwords: dict[str, str]
    # What a cluster's servers ask of each other on their route ports (``libs.embedded.ROUTE_USER``).
    route_password: str = ""

    def server_config(self) -> str:
        """The lines added to nats-server's config: TLS required of every client, and the users."""
        return tls_block(self.tls) + natsauth.authorization_block(natsauth.users(self.passwords))

    def secured(self, server: NatsConfig) -> NatsConfig:
        """``server`` with TLS and the users; a cluster member's route port with a password too, since a process
        that joins the cluster as a server is asked for no user at all."""
        if server.cluster is not None:
            if not self.route_password:
                raise SecureSetupError("no route password: make it with prepare()")
            server = replace(server, cluster=replace(server.cluster, route_password=self.route_password))
        return replace(server, extra_config=self.server_config())

    def client_env(self, user: str) -> dict[str, str]:
        """The variables (``libs.config.NatsSettings``) that make a process connect as ``user`` over TLS."""
        return {"NATS_USER": user, "NATS_PASSWORD": self.passwords[user], "NATS_TLS_CA": str(self.tls.ca)}

    def env_file(self, user: str) -> Path:
        """A file of ``export`` lines for ``user`` (0600): ``. <file>`` gives a shell the CLI's credentials."""
        path = self.folder / f"{user}.env"
        # Quoted: the CA's path is the state directory's, which may hold a space (a home folder "My Projects").
        lines = "".join(f"export {key}={shlex.quote(value)}\n" for key, value in self.client_env(user).items())
        _write_private(path, lines)
        return path


def tls_block(tls: TlsFiles) -> str:
    return (f"tls {{\n  cert_file: {json.dumps(str(tls.cert))}\n  key_file: {json.dumps(str(tls.key))}\n"
            f"  timeout: {TLS_HANDSHAKE_SECONDS}\n}}\n")


def prepare(folder: Path, users: Iterable[str]) -> SecureNats:
    """Certificates and passwords in ``folder`` (made if missing, kept otherwise), one password per user name, and
    one for the routes between a cluster's servers (apart: it is no client's)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    route = ensure_passwords(folder / "routes.json", [ROUTE_USER])[ROUTE_USER]
    return SecureNats(folder, make_certs(folder), ensure_passwords(folder / "passwords.json", users), route)


def ensure_passwords(path: Path, users: Iterable[str]) -> dict[str, str]:
    """A random password per user, kept in ``path`` (JSON, 0600); users already there keep theirs."""
    known: dict[str, str] = {}
    if path.exists():
        try:
            loaded = json.loads(path.read_text())
        except ValueError as err:
            raise SecureSetupError(f"{path} is not JSON: delete it and new passwords are made") from err
        if isinstance(loaded, dict):
            known = {str(k): str(v) for k, v in loaded.items()}
    users = list(users)
    wanted = {user: known.get(user) or secrets.token_hex(PASSWORD_BYTES) for user in users}
    if any(user not in known for user in users):
        _write_private(path, json.dumps({**known, **wanted}, indent=1, sort_keys=True) + "\n")
    return wanted


def make_certs(folder: Path, hosts: Mapping[str, str] | None = None) -> TlsFiles:
    """A CA and a server certificate signed by it for 127.0.0.1 and localhost (``hosts``: SAN type → value); kept
    when all three files exist."""
    files = TlsFiles(folder / "ca.crt", folder / "server.crt", folder / "server.key")
    if files.ca.exists() and files.cert.exists() and files.key.exists():
        return files
    openssl = shutil.which("openssl")
    if openssl is None:
        raise SecureSetupError("openssl not found: it makes the NATS server's certificates (apt-get install openssl)")
    sans = ",".join(f"{kind}:{value}" for kind, value in (hosts or {"IP": "127.0.0.1", "DNS": "localhost"}).items())
    ca_key = folder / "ca.key"
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        csr = Path(scratch) / "server.csr"
        extensions = Path(scratch) / "server.ext"
        extensions.write_text(f"subjectAltName={sans}\nbasicConstraints=critical,CA:FALSE\n"
                              "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        _openssl([openssl, "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(files.ca),
                  "-days", str(CERT_DAYS), "-subj", "/CN=Shoal NATS CA",
                  "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"])
        _openssl([openssl, "req", *ec, "-keyout", str(files.key), "-out", str(csr), "-subj", "/CN=shoal-nats"])
        _openssl([openssl, "x509", "-req", "-in", str(csr), "-CA", str(files.ca), "-CAkey", str(ca_key),
                  "-CAcreateserial", "-out", str(files.cert), "-days", str(CERT_DAYS),
                  "-extfile", str(extensions)])
    for secret in (ca_key, files.key):
        os.chmod(secret, 0o600)
    (folder / "ca.srl").unlink(missing_ok=True)
    return files


def _openssl(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    if done.returncode != 0:
        raise SecureSetupError(f"{' '.join(argv[:3])} failed: {done.stderr.strip()[-500:]}")


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only, never briefly readable by others."""
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    os.replace(temporary, path)
