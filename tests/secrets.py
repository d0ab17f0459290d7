"""Secrets for tests that plant them: files laid out like mounted Kubernetes Secrets, and the encryptOptions of an
S3 mount that name them."""

from __future__ import annotations

from pathlib import Path

from libs.events.dataset import EncryptOption, EncryptOptionSource, SecretKeySelector


def secret_files(root: Path, secrets: dict[str, dict[str, str]]) -> str:
    """Secrets laid out like mounted Kubernetes Secrets (``<dir>/<name>/<key>``); returns the folder."""
    for name, keys in secrets.items():
        (root / name).mkdir(parents=True)
        for key, value in keys.items():
            (root / name / key).write_text(value)
    return str(root)


def credentials_from(secret: str) -> list[EncryptOption]:
    return [EncryptOption(name=option, value_from=EncryptOptionSource(secret_key_ref=SecretKeySelector(secret, key)))
            for option, key in (("aws.accessKeyId", "id"), ("aws.secretKey", "secret"))]
