"""Secret files as the services read them (``libs.ufs.mounts.read_secrets``): a folder per Secret, or one mounted
Secret holding many under flat keys (``libs.mounts.flat_secret_key``, what the bridge's mirror writes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from libs.config import Secret
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetRecord, DatasetSpec, Mount
from libs.mounts import flat_secret_key
from libs.ufs.base import LocalLocation
from libs.ufs.mounts import MissingSecret, local_location_error, missing_secret_hint, read_secrets
from services.agent.mountd import MountedDataset
from services.dataset.sync import sync_metadata
from tests.helpers import make_settings
from tests.secrets import credentials_from, secret_files


def kubelet_volume(folder: Path, data: dict[str, str]) -> str:
    """A Secret volume as the kubelet lays it out: each key a link into a timestamped ``..data`` folder."""
    version = folder / "..2026_12_05_09_00_00.1"
    version.mkdir(parents=True)
    for key, value in data.items():
        (version / key).write_text(value)
    (folder / "..data").symlink_to(version.name)
    for key in data:
        (folder / key).symlink_to(f"..data/{key}")
    return str(folder)


def test_the_flat_layout_of_one_mounted_secret(tmp_path: Path) -> None:
    assert flat_secret_key("team.s3-creds", "secret") == "team.s3-creds.secret"
    folder = kubelet_volume(tmp_path / "mirror", {"team.s3-creds.id": "AKID\n", "team.s3-creds.secret": "SK"})
    refs = [("team.s3-creds", "id"), ("team.s3-creds", "secret"), ("team.s3-creds", "absent"), ("other", "id")]
    assert read_secrets(folder, "team", refs) == {("team.s3-creds", "id"): Secret("AKID"),
                                                  ("team.s3-creds", "secret"): Secret("SK")}


def test_a_folder_per_secret_is_read_first(tmp_path: Path) -> None:
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "key").write_text("nested")
    (tmp_path / "creds.key").write_text("flat")
    (tmp_path / "creds.other").write_text("flat only")
    assert read_secrets(str(tmp_path), "default", [("creds", "key"), ("creds", "other")]) == {
        ("creds", "key"): Secret("nested"), ("creds", "other"): Secret("flat only")}
    assert read_secrets("", "default", [("creds", "key")]) == {}


def test_same_named_secrets_of_two_namespaces_never_mix(tmp_path: Path) -> None:
    """The folder of secrets was not keyed by namespace: every Dataset naming ``s3-creds`` read ``<dir>/s3-creds``,
    whatever its namespace, and one could name another namespace's copy the bridge wrote (``team-a.s3-creds``)
    or mirrored (``team-a.s3-creds.id``). Each path is one namespace's now."""
    (tmp_path / "team-a" / "s3-creds").mkdir(parents=True)
    (tmp_path / "team-a" / "s3-creds" / "id").write_text("team-a's")
    (tmp_path / "team-b" / "s3-creds").mkdir(parents=True)
    (tmp_path / "team-b" / "s3-creds" / "id").write_text("team-b's")
    (tmp_path / "s3-creds").mkdir()
    (tmp_path / "s3-creds" / "id").write_text("default's")  # where every secret was: the default namespace's still
    (tmp_path / "team-a.bridged").mkdir()
    (tmp_path / "team-a.bridged" / "id").write_text("team-a's, as the bridge writes it")
    (tmp_path / "team-a.mirrored.id").write_text("team-a's, as the bridge mirrors it")
    (tmp_path / "creds.b.c").write_text("namespace creds' b key c, mirrored")
    refs = [("s3-creds", "id"), ("team-a.bridged", "id"), ("team-a.mirrored", "id"), ("creds", "b.c")]
    folder = str(tmp_path)

    def read(namespace: str) -> dict[str, str]:
        return {f"{name}/{key}": value.reveal() for (name, key), value in read_secrets(folder, namespace, refs).items()}

    assert read("team-a") == {"s3-creds/id": "team-a's", "team-a.bridged/id": "team-a's, as the bridge writes it",
                              "team-a.mirrored/id": "team-a's, as the bridge mirrors it"}
    assert read("team-b") == {"s3-creds/id": "team-b's"}
    assert read("default") == {"s3-creds/id": "default's"}  # not namespace creds' mirrored key either
    assert read("other") == {}
    # Put where only the default namespace's are read, another namespace's secret is pointed to its folder.
    assert missing_secret_hint(folder, "other", refs) == (
        f"; {tmp_path}/s3-creds/id is not read for namespace 'other' (a secret there is the 'default' namespace's): "
        f"put it in {tmp_path}/other/s3-creds/id")
    # team-a's copy is not read for namespace other: the hint says where other's would be, and nothing of team-a's.
    assert missing_secret_hint(folder, "other", [("team-a.bridged", "id")]) == (
        f"; looked for {tmp_path}/other/team-a.bridged/id: write the key to {tmp_path}/other/team-a.bridged/id "
        "(SHOAL_SECRETS_DIR/<namespace>/<secret>/<key>)")


def test_a_missing_secret_says_where_it_was_looked_for(tmp_path: Path) -> None:
    """"secret 'creds' has no key 'id'" did not say where Shoal reads secrets from: the hint names the paths looked
    at for the first missing key, and where to write it; never what any file holds."""
    folder = str(tmp_path)
    (tmp_path / "team" / "creds").mkdir(parents=True)
    (tmp_path / "team" / "creds" / "id").write_text("AKID-VALUE")
    refs = [("creds", "id"), ("creds", "secret")]  # the folder is there, one key file is not
    hint = missing_secret_hint(folder, "team", refs)
    assert hint == (f"; looked for {tmp_path}/team/creds/secret: write the key to {tmp_path}/team/creds/secret "
                    "(SHOAL_SECRETS_DIR/<namespace>/<secret>/<key>)")
    assert "AKID-VALUE" not in hint
    # A whole secret missing, in the default namespace: every path it may be at.
    assert missing_secret_hint(folder, "default", [("gone", "id")]) == (
        f"; looked for {tmp_path}/default/gone/id and {tmp_path}/gone/id and {tmp_path}/gone.id: write the key to "
        f"{tmp_path}/default/gone/id (SHOAL_SECRETS_DIR/<namespace>/<secret>/<key>)")
    # The Kubernetes bridge's copy (named <namespace>.<secret>): the bridge writes it, so only where it was looked.
    assert missing_secret_hint(folder, "team", [("team.bridged", "id")]) == (
        f"; looked for {tmp_path}/team/team.bridged/id and {tmp_path}/team.bridged/id and {tmp_path}/team.bridged.id")
    # Every key there (a MissingSecret for another reason, such as a key that is not text): nothing to add.
    assert missing_secret_hint(folder, "team", [("creds", "id")]) == ""


def test_a_claim_folder_must_exist_and_hold_the_mounted_path(tmp_path: Path) -> None:
    claim = tmp_path / "team" / "data"
    missing = local_location_error(LocalLocation(root=claim / "sub", claim_root=claim), [])
    assert missing is not None and "volume claim 'data' of namespace 'team' is not mounted" in missing
    assert "SHOAL_PVC_ROOT/<namespace>/<claim>" in missing
    (claim / "sub").mkdir(parents=True)
    assert local_location_error(LocalLocation(root=claim / "sub", claim_root=claim), []) is None
    assert "folder 'other' does not exist" in (local_location_error(
        LocalLocation(root=claim / "other", claim_root=claim), []) or "")
    (claim / "out").symlink_to(tmp_path)
    assert "outside volume claim 'data'" in (local_location_error(
        LocalLocation(root=claim / "out", claim_root=claim), []) or "")
    # local:// keeps its own rule: SHOAL_LOCAL_ROOTS.
    assert "SHOAL_LOCAL_ROOTS" in (local_location_error(LocalLocation(root=claim), []) or "")


def test_a_secret_file_that_is_not_text_is_a_missing_secret_saying_so_not_a_crash(tmp_path: Path) -> None:
    """A binary file where a key belongs (a keytab, a file written encoded): the sync or the mount fails with a
    reason naming the secret and the key, never with what the file holds, and not with a UnicodeDecodeError."""
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "id").write_bytes(b"\xff\xfeBINARY-SECRET\x00")
    with pytest.raises(MissingSecret, match=r"secret 'creds' key 'id' .* is not UTF-8 text") as caught:
        read_secrets(str(tmp_path), "default", [("creds", "id")])
    assert "BINARY" not in str(caught.value)


async def test_a_node_missing_a_secret_says_where_it_looked_as_the_dataset_service_does(tmp_path: Path) -> None:
    """The mount process on a node whose secret folder lacks a key failed with "secret 's3-creds' has no key
    'secret'" alone (quoted in its agent's heartbeat and the dataset's Mounted condition), while the dataset
    service's sync said where it had looked and where to write the key: both say the same now, never the value."""
    secrets = secret_files(tmp_path / "secrets", {"s3-creds": {"id": "AKID-ON-DISK"}})  # the node lacks "secret"
    mount = Mount(mount_point="s3://user:PASSWORD@bucket/", encrypt_options=credentials_from("s3-creds"))
    dataset = Dataset(metadata=ObjectMeta(name="demo"), spec=DatasetSpec(mounts=[mount]))
    settings = make_settings("nats://127.0.0.1:1", secrets_dir=secrets)
    listed = await sync_metadata(DatasetRecord(dataset=dataset, generation=1), None,  # type: ignore[arg-type]
                                 settings.s3, page_size=10)
    agent = MountedDataset(settings, None, "default", "demo", str(tmp_path / "mnt"))  # type: ignore[arg-type]
    with pytest.raises(SystemExit) as caught:
        agent._update_gates(DatasetRecord(dataset=dataset, generation=1))
    said = str(caught.value)
    assert said == f"dataset default/demo: {listed.error}"
    assert f"; looked for {secrets}/default/s3-creds/secret and {secrets}/s3-creds/secret" in said
    assert f"write the key to {secrets}/default/s3-creds/secret" in said
    assert "AKID-ON-DISK" not in said and "PASSWORD" not in said
