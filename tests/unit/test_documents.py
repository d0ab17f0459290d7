"""Manifests → commands (libs.documents): Shoal kinds, Fluid kinds, ignored-field notes, errors. Pure."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import msgspec
import pytest

from libs import subjects
from libs.documents import (
    COMMAND_HEADROOM,
    SHOAL_API,
    ManifestError,
    alluxio_size,
    documents_to_commands,
    juicefs_size,
    parse_documents,
    too_large,
)
from libs.events.common import ObjectMeta, parse_quantity
from libs.events.dataset import DatasetApply, DatasetDelete
from libs.events.operation import (
    CleanTarget,
    DataCleanApply,
    DataCleanDelete,
    DataCleanSpec,
    DataLoad,
    DataLoadApply,
    DataLoadDelete,
    DataLoadSpec,
    DatasetRef,
    OperationRef,
    TargetPath,
)
from libs.events.runtime import Level, RuntimeApply, RuntimeDelete, directory_quotas
from services.runtime.domain import validate_runtime


def load(text: str) -> list[object]:
    return parse_documents(textwrap.dedent(text))


SHOAL = """
    apiVersion: shoal.io/v1alpha1
    kind: Dataset
    metadata:
      name: demo
      labels: {team: ml}
    spec:
      mounts:
        - name: demo
          mountPoint: s3://demo/train/
          options: {endpoint: "http://127.0.0.1:8333", pathStyle: "true"}
    ---
    apiVersion: shoal.io/v1alpha1
    kind: Runtime
    metadata:
      name: demo
      namespace: ml
    spec:
      replicas: 2
      blockSize: 4Mi
      tieredstore:
        levels:
          - {mediumtype: MEM, quota: 1Gi, high: "0.95", low: "0.7"}
    """


def test_shoal_kinds_become_apply_commands_without_notes() -> None:
    commands, notes, errors = documents_to_commands(load(SHOAL))

    assert (notes, errors) == ([], [])
    dataset, runtime = commands
    assert (dataset.kind, dataset.name, dataset.namespace, dataset.subject) == (
        "dataset", "demo", "default", subjects.DATASET_APPLY)
    assert isinstance(dataset.event, DatasetApply)
    assert dataset.event.dataset.metadata.labels == {"team": "ml"}
    assert dataset.event.dataset.spec.mounts[0].options == {"endpoint": "http://127.0.0.1:8333", "pathStyle": "true"}
    assert dataset.resource == "dataset.shoal.io/demo"
    assert (runtime.kind, runtime.namespace, runtime.subject, runtime.document) == (
        "runtime", "ml", subjects.RUNTIME_APPLY, 2)
    assert isinstance(runtime.event, RuntimeApply)
    assert runtime.event.runtime.spec.replicas == 2
    assert runtime.event.runtime.spec.tieredstore.levels == [Level(mediumtype="MEM", quota="1Gi", high="0.95",
                                                                   low="0.7")]


def test_delete_action_makes_delete_commands_and_default_namespace_applies() -> None:
    commands, _, errors = documents_to_commands(load(SHOAL), default_namespace="team-a", action="delete")

    assert errors == []
    assert [(c.subject, type(c.event)) for c in commands] == [
        (subjects.DATASET_DELETE, DatasetDelete), (subjects.RUNTIME_DELETE, RuntimeDelete)]
    assert commands[0].event == DatasetDelete(id=commands[0].event.id, name="demo", namespace="team-a")
    # A namespace written in the document wins over the default.
    assert commands[1].namespace == "ml"


def test_unknown_fields_of_shoal_kinds_are_reported_not_dropped_silently() -> None:
    docs = load("""
        apiVersion: shoal.io/v1alpha1
        kind: Dataset
        metadata: {name: demo, uid: abc}
        spec:
          mounts: [{mountPoint: "s3://demo/", mountpoint: typo}]
          colour: blue
        status: {phase: Bound}
        """)

    commands, notes, errors = documents_to_commands(docs)

    assert errors == [] and len(commands) == 1
    assert sorted(notes) == [
        "ignored: Dataset default/demo: metadata.uid (not used by Shoal)",
        "ignored: Dataset default/demo: spec.colour (unknown field)",
        "ignored: Dataset default/demo: spec.mounts[0].mountpoint (unknown field)",
        "ignored: Dataset default/demo: status (status is computed by Shoal)",
    ]


def test_a_misspelt_field_is_named_with_the_field_it_was_likely_meant_to_be() -> None:
    """A typo is ignored, and what the object then lacks refused without a word of the spelling ("spec.mounts must
    list at least one mount" for ``mount:``): the note names the field meant."""
    docs = load("""
        apiVersion: shoal.io/v1alpha1
        kind: Dataset
        metadata: {name: demo}
        spec:
          mount: [{mountPoint: "s3://demo/"}]
          placment: Shared
        ---
        apiVersion: shoal.io/v1alpha1
        kind: Runtime
        metadata: {name: demo}
        spec:
          tieredstore:
            levels: [{mediumtype: MEM, quota: 1Gi, hight: "0.9"}]
          colour: blue
        ---
        apiVersion: shoal.io/v1alpha1
        kind: Dataset
        metadata: {name: other}
        spec:
          mounts: [{mountPoint: "s3://demo/", Readonly: "true"}]
        """)

    _, notes, _ = documents_to_commands(docs)

    assert sorted(notes) == [
        # Each names its object: two Datasets of the file, the kind alone did not say whose "Readonly" it was.
        "ignored: Dataset default/demo: spec.mount (unknown field; did you mean spec.mounts?)",
        "ignored: Dataset default/demo: spec.placment (unknown field; did you mean spec.placement?)",
        "ignored: Dataset default/other: spec.mounts[0].Readonly (unknown field; did you mean "
        "spec.mounts[0].readOnly?)",
        "ignored: Runtime default/demo: spec.colour (unknown field)",
        "ignored: Runtime default/demo: spec.tieredstore.levels[0].hight (unknown field; did you mean "
        "spec.tieredstore.levels[0].high?)",
    ]



def test_a_refused_document_names_the_misspelt_field_it_lacks() -> None:
    """A document refused for a field it lacks (its notes are not shown) names the misspelt field next to it: a
    Fluid Dataset's ``mountpoint`` got only msgspec's "missing required field `mountPoint`"."""
    docs = load("""
        apiVersion: data.fluid.io/v1alpha1
        kind: Dataset
        metadata: {name: demo}
        spec:
          mounts: [{mountpoint: "s3://demo/"}]
        ---
        apiVersion: data.fluid.io/v1alpha1
        kind: DataLoad
        metadata: {name: warm}
        spec:
          datset: {name: demo}
        """)

    commands, _, errors = documents_to_commands(docs)

    assert not commands
    assert errors == [
        "document 1 (Dataset demo): Object missing required field `mountPoint` - at `$.spec.mounts[0]`; "
        "spec.mounts[0].mountpoint is not a field of Dataset: did you mean spec.mounts[0].mountPoint?",
        "document 2 (DataLoad warm): Object missing required field `dataset` - at `$.spec`; "
        "spec.datset is not a field of DataLoad: did you mean spec.dataset?",
    ]

FLUID_DATASET = """
    apiVersion: data.fluid.io/v1alpha1
    kind: Dataset
    metadata:
      name: imagenet
      namespace: ml
      creationTimestamp: "2024-01-01T00:00:00Z"
    spec:
      mounts:
        - mountPoint: s3://imagenet/train/
          name: train
          options:
            alluxio.underfs.s3.endpoint: http://minio:9000
            alluxio.underfs.s3.endpoint.region: eu-west-1
            alluxio.underfs.s3.disable.dns.buckets: "true"
            alluxio.underfs.s3.inherit.acl: "false"
          encryptOptions:
            - name: aws.accessKeyId
              valueFrom: {secretKeyRef: {name: s3-creds, key: id}}
            - name: aws.secretKey
              valueFrom: {secretKeyRef: {name: s3-creds, key: secret}}
          readOnly: true
      owner: {uid: 1000, gid: 1000, user: ml, group: ml}
      nodeAffinity:
        required:
          nodeSelectorTerms:
            - matchExpressions: [{key: gpu, operator: In, values: ["true"]}]
      tolerations: [{key: dedicated, operator: Equal, value: ml, effect: NoSchedule}]
      accessModes: [ReadOnlyMany]
      placement: Shared
      sharedOptions: {alluxio.underfs.s3.endpoint: "http://minio:9000"}
      dataRestoreLocation: {path: "local:///backup"}
      runtimes: [{name: imagenet, namespace: ml}]
    """


def test_fluid_dataset_maps_one_to_one_and_renames_alluxio_s3_options() -> None:
    commands, notes, errors = documents_to_commands(load(FLUID_DATASET))

    assert errors == []
    (command,) = commands
    assert isinstance(command.event, DatasetApply)
    spec = command.event.dataset.spec
    assert spec.mounts[0].options == {
        "endpoint": "http://minio:9000",
        "region": "eu-west-1",
        "pathStyle": "true",
    }
    assert [option.name for option in spec.mounts[0].encrypt_options] == ["aws.accessKeyId", "aws.secretKey"]
    assert spec.mounts[0].encrypt_options[1].value_from.secret_key_ref.key == "secret"
    assert spec.mounts[0].read_only is True
    assert spec.owner is not None and spec.owner.uid == 1000
    assert spec.node_affinity is not None and "required" in spec.node_affinity
    assert spec.tolerations[0]["effect"] == "NoSchedule"
    assert (spec.access_modes, spec.placement) == (["ReadOnlyMany"], "Shared")
    assert spec.shared_options == {"endpoint": "http://minio:9000"}
    assert (command.kind, command.namespace, command.source_kind) == ("dataset", "ml", "Dataset")
    assert sorted(notes) == [
        "ignored: Dataset ml/imagenet: metadata.creationTimestamp (not used by Shoal)",
        "ignored: Dataset ml/imagenet: spec.dataRestoreLocation (not used by Shoal)",
        'ignored: Dataset ml/imagenet: spec.mounts[0].options["alluxio.underfs.s3.inherit.acl"] (an Alluxio setting, '
        "not used by Shoal)",
        "ignored: Dataset ml/imagenet: spec.runtimes (not used by Shoal)",
    ]


def test_other_options_of_a_fluid_dataset_still_reach_the_dataset_service() -> None:
    """Only Alluxio's own settings are noted and left out; any other option (and an Alluxio-named secret, which the
    clear-text check refuses) goes on to the dataset service, which says why it is not supported."""
    commands, notes, errors = documents_to_commands(load("""
        apiVersion: data.fluid.io/v1alpha1
        kind: Dataset
        metadata: {name: demo}
        spec:
          sharedOptions: {alluxio.underfs.s3.threads.max: "64", fs.oss.endpoint: oss.example.com}
          mounts:
            - mountPoint: s3://spark/fluid-data
              options: {alluxio.underfs.s3.secret.key: planted, cache.mode: aggressive}
        """))

    assert errors == []
    assert isinstance(commands[0].event, DatasetApply)
    spec = commands[0].event.dataset.spec
    assert spec.shared_options == {"fs.oss.endpoint": "oss.example.com"}
    assert spec.mounts[0].options == {"alluxio.underfs.s3.secret.key": "planted", "cache.mode": "aggressive"}
    assert notes == ['ignored: Dataset default/demo: spec.sharedOptions["alluxio.underfs.s3.threads.max"] (an Alluxio '
                     "setting, not used by Shoal)"]


ALLUXIO = """
    apiVersion: data.fluid.io/v1alpha1
    kind: AlluxioRuntime
    metadata: {name: imagenet, namespace: ml}
    spec:
      replicas: 3
      master: {replicas: 1}
      fuse: {args: [fuse, --fuse-opts=kernel_cache]}
      properties:
        alluxio.user.block.size.bytes.default: 64MB
        alluxio.user.file.writetype.default: MUST_CACHE
      tieredstore:
        levels:
          - mediumtype: MEM
            path: /dev/shm
            quota: 2Gi
            high: "0.95"
            low: "0.7"
          - mediumtype: SSD
            volumeType: emptyDir
            path: /mnt/ssd
            quota: 100Gi
            high: "0.9"
            low: "0.5"
    """


def test_alluxio_runtime_keeps_replicas_tiers_and_block_size_and_reports_the_rest() -> None:
    commands, notes, errors = documents_to_commands(load(ALLUXIO))

    assert errors == []
    (command,) = commands
    assert (command.kind, command.subject, command.source_kind) == ("runtime", subjects.RUNTIME_APPLY,
                                                                    "AlluxioRuntime")
    assert isinstance(command.event, RuntimeApply)
    spec = command.event.runtime.spec
    assert spec.replicas == 3
    assert spec.block_size == "64Mi"  # Alluxio's MB is 2**20 bytes
    assert spec.tieredstore.levels == [
        Level(mediumtype="MEM", path="/dev/shm", quota="2Gi", high="0.95", low="0.7"),
        Level(mediumtype="SSD", path="/mnt/ssd", quota="100Gi", high="0.9", low="0.5"),
    ]
    assert sorted(notes) == [
        "ignored: AlluxioRuntime ml/imagenet: spec.fuse (not used by Shoal)",
        "ignored: AlluxioRuntime ml/imagenet: spec.master (not used by Shoal)",
        'ignored: AlluxioRuntime ml/imagenet: spec.properties["alluxio.user.file.writetype.default"] (not used by '
        "Shoal)",
        "ignored: AlluxioRuntime ml/imagenet: spec.tieredstore.levels[1].volumeType (not used by Shoal)",
    ]


JUICEFS_LOW = ("(JuiceFS's free-space-ratio, the share of the disk kept free, not a watermark: Shoal evicts from 0.95 "
               "down to 0.7 of the quota)")


def test_juicefs_low_is_the_free_space_ratio_not_a_watermark() -> None:
    """Fluid's JuiceFS engine passes a tier's ``low`` to JuiceFS as ``free-space-ratio`` and never reads ``high``
    (``pkg/ddc/juicefs/transform_fuse.go``, ``genMountOptions``). Before, every Fluid JuiceFS sample's ``low: "0.1"``
    became Shoal's low watermark: each eviction threw away 85% of the cache."""
    commands, notes, errors = documents_to_commands(load("""
        apiVersion: data.fluid.io/v1alpha1
        kind: JuiceFSRuntime
        metadata: {name: jfsdemo}
        spec:
          replicas: 1
          tieredstore:
            levels:
              - {mediumtype: SSD, path: /var/jfsCache, quota: 40Gi, high: "0.9", low: "0.1"}
        """))

    assert errors == []
    assert isinstance(commands[0].event, RuntimeApply)
    assert commands[0].event.runtime.spec.tieredstore.levels == [
        Level(mediumtype="SSD", path="/var/jfsCache", quota="40Gi")]
    assert notes == [
        "ignored: JuiceFSRuntime default/jfsdemo: spec.tieredstore.levels[0].high (not used by Fluid's JuiceFS "
        "engine: Shoal evicts from 0.95 down to 0.7 of the quota)",
        f"ignored: JuiceFSRuntime default/jfsdemo: spec.tieredstore.levels[0].low {JUICEFS_LOW}",
    ]


def test_juicefs_cache_paths_separated_by_colons_are_several_paths() -> None:
    """JuiceFS separates its cache directories with ':' and Fluid passes a JuiceFSRuntime tier's path to it as
    ``cache-dir`` (docs/zh/samples/juicefs/juicefs_cache_dir.md: ``path: /mnt/cache1:/mnt/cache2``). Before, Shoal
    took the whole text for one directory, ``/mnt/cache1:`` with ``cache2`` below it."""
    commands, _, errors = documents_to_commands(load("""
        apiVersion: data.fluid.io/v1alpha1
        kind: JuiceFSRuntime
        metadata: {name: jfsdemo}
        spec:
          tieredstore:
            levels: [{mediumtype: SSD, path: "/mnt/cache1:/mnt/cache2", quota: 40Gi}]
        """))

    assert errors == []
    assert isinstance(commands[0].event, RuntimeApply)
    assert commands[0].event.runtime.spec.tieredstore.levels == [
        Level(mediumtype="SSD", path="/mnt/cache1,/mnt/cache2", quota="40Gi")]


def test_juicefs_runtime_reads_block_size_in_kib_from_fuse_options() -> None:
    docs = load("""
        apiVersion: data.fluid.io/v1alpha1
        kind: JuiceFSRuntime
        metadata: {name: jfs}
        spec:
          replicas: 1
          configs: [trash-days=0, "secret-key=pl4nted-s3cret"]
          fuse:
            image: juicedata/juicefs-fuse
            options: {block-size: "1024", writeback: ""}
          worker: {options: {cache-size: "1024"}}
          tieredstore:
            levels: [{mediumtype: SSD, path: /var/jfsCache, quota: 40960, low: "0.1"}]
        """)

    commands, notes, errors = documents_to_commands(docs)

    assert errors == []
    (command,) = commands
    assert isinstance(command.event, RuntimeApply)
    spec = command.event.runtime.spec
    assert spec.block_size == "1Mi"  # 1024 KiB
    assert spec.tieredstore.levels == [Level(mediumtype="SSD", path="/var/jfsCache", quota=40960)]
    assert sorted(notes) == [
        "ignored: JuiceFSRuntime default/jfs: spec.configs[0] (--trash-days) (not used by Shoal)",
        "ignored: JuiceFSRuntime default/jfs: spec.configs[1] (--secret-key) (not used by Shoal)",
        "ignored: JuiceFSRuntime default/jfs: spec.fuse.image (not used by Shoal)",
        'ignored: JuiceFSRuntime default/jfs: spec.fuse.options["writeback"] (not used by Shoal)',
        f"ignored: JuiceFSRuntime default/jfs: spec.tieredstore.levels[0].low {JUICEFS_LOW}",
        "ignored: JuiceFSRuntime default/jfs: spec.worker (not used by Shoal)",
    ]
    assert "pl4nted-s3cret" not in repr(notes)  # notes become Kubernetes Events: a flag's value may be a secret


def test_the_juicefs_example_gives_a_40_gib_tier_and_4_mib_blocks() -> None:
    # Fluid's quota is a resource.Quantity (api/v1alpha1/common.go) and its JuiceFS engine turns it into cache-size
    # with Value() >> 20 (MiB): a bare number is bytes there too, so the example spells its unit.
    example = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "fluid-juicefsruntime.yaml"

    commands, notes, errors = documents_to_commands(parse_documents(example.read_text()))

    assert errors == []
    (command,) = commands
    assert isinstance(command.event, RuntimeApply)
    spec = command.event.runtime.spec
    assert spec.replicas == 1
    assert parse_quantity(spec.block_size) == 4 * 2**20
    assert spec.tieredstore.levels == [Level(mediumtype="SSD", path="/var/jfsCache", quota="40Gi")]
    assert parse_quantity(spec.tieredstore.levels[0].quota) == 40 * 2**30
    assert sorted(notes) == [
        "ignored: JuiceFSRuntime default/jfs: spec.configs[0] (--trash-days) (not used by Shoal)",
        "ignored: JuiceFSRuntime default/jfs: spec.fuse.image (not used by Shoal)",
        f"ignored: JuiceFSRuntime default/jfs: spec.tieredstore.levels[0].low {JUICEFS_LOW}",
    ]


def test_a_bare_number_quota_is_bytes_as_in_fluid() -> None:
    assert parse_quantity(40960) == 40960  # Fluid: cache-size = 40960 >> 20 = 0 MiB, not 40 GiB


def test_juicefs_block_size_from_format_configs() -> None:
    docs = load("""
        apiVersion: data.fluid.io/v1alpha1
        kind: JuiceFSRuntime
        metadata: {name: jfs}
        spec:
          configs: ["--block-size=4096"]
        """)

    commands, notes, errors = documents_to_commands(docs)

    assert (notes, errors) == ([], [])
    assert isinstance(commands[0].event, RuntimeApply)
    assert commands[0].event.runtime.spec.block_size == "4Mi"


QUOTA_LIST = """
    apiVersion: data.fluid.io/v1alpha1
    kind: AlluxioRuntime
    metadata: {name: dataset}
    spec:
      replicas: 2
      tieredstore:
        levels:
          - mediumtype: MEM
            path: /dev/shm
            quota: 2Gi
          - path: /mnt/ssd0/cache,/mnt/ssd1/cache
            mediumtype: SSD
            quotaList: %s
    """


def test_fluid_quota_list_of_equal_quotas_is_the_tiers_quota() -> None:
    """Fluid's ``quotaList`` gives each path of a tier its own quota (``pkg/ddc/base/runtime.go``,
    ``convertToTieredstoreInfo``), with no ``quota`` needed. Before, such a tier was refused with "Object missing
    required field `quota`"."""
    commands, notes, errors = documents_to_commands(load(QUOTA_LIST % "2Gi,2Gi"))

    assert (notes, errors) == ([], [])
    assert isinstance(commands[0].event, RuntimeApply)
    assert commands[0].event.runtime.spec.tieredstore.levels == [
        Level(mediumtype="MEM", path="/dev/shm", quota="2Gi"),
        Level(mediumtype="SSD", path="/mnt/ssd0/cache,/mnt/ssd1/cache", quota="4Gi", quota_list="2Gi,2Gi"),
    ]


@pytest.mark.parametrize(("quota_list", "errors"), [
    ("3Mi,3Mi", [f"spec.tieredstore.levels[1].quotaList[{i}] '3Mi' is too small to hold one block of spec.blockSize "
                 "'4Mi'" for i in (0, 1)]),
    ("0, 0", ["spec.tieredstore.levels[1].quotaList '0,0': every quota must be greater than 0"]),
])
def test_a_fluid_quota_list_of_equal_quotas_is_refused_naming_the_list_as_written(
        quota_list: str, errors: list[str]) -> None:
    """The runtime service's refusal of a Fluid tier's equal quotas names ``quotaList`` and the entry, as the user
    wrote them. Before, the list was dropped for the sum and the refusal named a ``.quota '6Mi'`` (or ``.quota must
    be greater than 0``) the user never wrote."""
    commands, _, problems = documents_to_commands(load(QUOTA_LIST % quota_list))
    assert problems == []
    assert isinstance(commands[0].event, RuntimeApply)

    refused = validate_runtime(commands[0].event.runtime)

    assert [error[:len(wanted)] for error, wanted in zip(refused, errors, strict=False)] == errors, refused
    assert len(refused) == len(errors) and not [error for error in refused if ".quota " in error], refused


def test_fluid_quota_list_wins_over_quota_as_in_fluid_and_says_so() -> None:
    text = (QUOTA_LIST % "1.5Gi,1536Mi").replace("mediumtype: SSD", "mediumtype: SSD\n            quota: 1Gi")

    commands, notes, errors = documents_to_commands(load(text))

    assert errors == []
    assert isinstance(commands[0].event, RuntimeApply)
    assert commands[0].event.runtime.spec.tieredstore.levels[1].quota == "3Gi"
    assert notes == ["ignored: AlluxioRuntime default/dataset: spec.tieredstore.levels[1].quota (quotaList is used, as "
                     "in Fluid)"]


def quantity_error(text: str) -> str:
    """What ``parse_quantity`` says of ``text``."""
    with pytest.raises(ValueError) as refused:
        parse_quantity(text)
    return str(refused.value)


def test_fluid_quota_list_of_different_quotas_gives_each_path_its_own() -> None:
    """Each directory holds at most its own quota (``directory_quotas``, the agent's cache); the tier's quota is
    their sum. Before, different quotas were refused ("Shoal splits a tier's quota equally across its paths")."""
    commands, notes, errors = documents_to_commands(load(QUOTA_LIST % "3Gi, 2Gi"))

    assert (notes, errors) == ([], [])
    assert isinstance(commands[0].event, RuntimeApply)
    level = commands[0].event.runtime.spec.tieredstore.levels[1]
    assert level == Level(mediumtype="SSD", path="/mnt/ssd0/cache,/mnt/ssd1/cache", quota="5Gi",
                          quota_list="3Gi,2Gi")
    assert directory_quotas(level) == [("/mnt/ssd0/cache", 3 * 2**30), ("/mnt/ssd1/cache", 2 * 2**30)]


def test_a_quota_list_counts_the_directories_of_a_path_with_a_trailing_comma_as_the_agent_does() -> None:
    """``path: a,b,`` names two directories, for the agent's cache and for a tier with ``quota``: a quotaList of
    two is theirs (before, it was refused: "2 quotas for the 3 paths")."""
    text = (QUOTA_LIST % "3Gi, 2Gi").replace("/mnt/ssd1/cache", "/mnt/ssd1/cache, ")

    commands, notes, errors = documents_to_commands(load(text))

    assert (notes, errors) == ([], [])
    assert isinstance(commands[0].event, RuntimeApply)
    level = commands[0].event.runtime.spec.tieredstore.levels[1]
    assert directory_quotas(level) == [("/mnt/ssd0/cache", 3 * 2**30), ("/mnt/ssd1/cache", 2 * 2**30)]


@pytest.mark.parametrize(("quota_list", "error"), [
    ("2Gi", "spec.tieredstore.levels[1].quotaList '2Gi' has 1 quota for the 2 paths in path: give one quota per "
            "path, in the same order"),
    ("2Gi,lots", f"spec.tieredstore.levels[1].quotaList '2Gi,lots': {quantity_error('lots')}"),
    ("[2Gi, 2Gi]", "spec.tieredstore.levels[1].quotaList must be a text of comma-separated quotas, like "
                   "'100Gi,50Gi'"),
])
def test_a_quota_list_that_is_wrong_is_refused_saying_why(quota_list: str, error: str) -> None:
    commands, _, errors = documents_to_commands(load(QUOTA_LIST % quota_list))

    assert commands == []
    assert errors == [f"document 1 (AlluxioRuntime dataset): {error}"]


@pytest.mark.parametrize(("quota_list", "total"), [("100Gi, 50Gi", " (quota: 150Gi)"), ("100Gi,lots", "")])
def test_a_shoal_tier_with_a_quota_list_and_no_quota_is_refused_saying_quota_is_their_sum(
        quota_list: str, total: str) -> None:
    """Shoal's own kind states the tier's quota (its CRD requires it, and the runtime service refuses one that is
    not the list's sum rather than correct it), so it is not derived as for Fluid's kinds; the refusal says what to
    write. Before, it said only "Object missing required field `quota`"."""
    text = f"""
    apiVersion: shoal.io/v1alpha1
    kind: Runtime
    metadata: {{name: demo}}
    spec:
      tieredstore:
        levels:
          - mediumtype: SSD
            path: /mnt/a,/mnt/b
            quotaList: {quota_list}
    """
    commands, _, errors = documents_to_commands(load(text))

    assert commands == []
    assert errors == [f"document 1 (Runtime demo): spec.tieredstore.levels[0].quota is required with quotaList "
                      f"{quota_list!r}: give the tier's quota, the sum of quotaList{total}"]


def test_a_fluid_tier_without_quota_or_quota_list_says_to_give_one() -> None:
    commands, _, errors = documents_to_commands(load((QUOTA_LIST % "x").replace("quotaList: x", "high: '0.9'")))

    assert commands == []
    assert errors == ["document 1 (AlluxioRuntime dataset): spec.tieredstore.levels[1] needs quota (the tier's size, "
                      "e.g. 100Gi) or quotaList (one quota per path)"]


def test_other_fluid_runtimes_map_replicas_and_report_everything_else() -> None:
    docs = load("""
        apiVersion: data.fluid.io/v1alpha1
        kind: JindoRuntime
        metadata: {name: jindo}
        spec:
          replicas: 2
          properties: {jfs.cache.size: 1g}
        """)

    commands, notes, errors = documents_to_commands(docs)

    assert errors == []
    assert isinstance(commands[0].event, RuntimeApply)
    assert commands[0].event.runtime.spec.replicas == 2
    assert notes == ["ignored: JindoRuntime default/jindo: spec.properties (not used by Shoal)"]


def test_unknown_kind_or_api_version_is_an_error_and_other_documents_still_convert() -> None:
    docs = load("""
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: cm}
        ---
        apiVersion: shoal.io/v1alpha1
        kind: AlluxioRuntime
        metadata: {name: wrong-group}
        ---
        apiVersion: shoal.io/v1alpha1
        kind: Dataset
        metadata: {name: good}
        spec: {mounts: [{mountPoint: "local:///data"}]}
        """)

    commands, _, errors = documents_to_commands(docs)

    assert [c.name for c in commands] == ["good"]
    assert len(errors) == 2
    assert errors[0].startswith("document 1 (ConfigMap cm): unknown kind 'ConfigMap' of apiVersion 'v1'")
    assert errors[1].startswith("document 2 (AlluxioRuntime wrong-group): unknown kind 'AlluxioRuntime'")
    assert "AlluxioRuntime" in errors[0] and "data.fluid.io/v1alpha1" in errors[0]


def test_a_document_without_api_version_or_kind_says_so_and_never_names_a_kind_none() -> None:
    docs = load("""
        metadata: {name: a}
        ---
        kind: Dataset
        metadata: {name: b}
        ---
        apiVersion: shoal.io/v1alpha1
        kind: ""
        ---
        root:x:0:0:root:/root:/bin/bash
        """)

    _, _, errors = documents_to_commands(docs)

    assert errors == [
        "document 1: apiVersion and kind are required (not a Kubernetes or Fluid manifest?)",
        "document 2: apiVersion is required (not a Kubernetes or Fluid manifest?)",
        "document 3: kind is required (not a Kubernetes or Fluid manifest?)",
        "document 4: expected a mapping with apiVersion, kind, metadata and spec, got str",
    ]


def test_schema_violation_names_the_document_and_the_path() -> None:
    docs = load("""
        apiVersion: shoal.io/v1alpha1
        kind: Dataset
        metadata: {name: bad}
        spec:
          mounts:
            - mountPoint: 42
        ---
        apiVersion: data.fluid.io/v1alpha1
        kind: AlluxioRuntime
        metadata: {name: bad-tiers}
        spec:
          tieredstore:
            levels: [{quota: 1Gi}]
        """)

    commands, _, errors = documents_to_commands(docs)

    assert commands == []
    assert errors == [
        "document 1 (Dataset bad): Expected `str`, got `int` - at `$.spec.mounts[0].mountPoint`",
        "document 2 (AlluxioRuntime bad-tiers): Object missing required field `mediumtype` - at "
        "`$.spec.tieredstore.levels[0]`",
    ]


FLUID_SAMPLES = Path(__file__).parent.parent / "fixtures" / "fluid"


def test_a_value_of_a_mapping_refused_is_named_by_its_key() -> None:
    """msgspec names a mapping's value ``[...]``: "at `$.spec.mounts[0].options[...]`" left the reader to find
    which of the options; Fluid's S3 sample has encryptOptions inside options, and an unquoted ``true`` is the usual
    slip. The key is named as the manifest writes it, an Alluxio spelling too."""
    sample = parse_documents((FLUID_SAMPLES / "s3_configuration.yaml").read_text())
    docs = load("""
        apiVersion: data.fluid.io/v1alpha1
        kind: Dataset
        metadata: {name: minio}
        spec:
          mounts:
            - mountPoint: s3://a/
            - mountPoint: s3://b/
              options: {alluxio.underfs.s3.disable.dns.buckets: true}
        ---
        apiVersion: shoal.io/v1alpha1
        kind: Dataset
        metadata: {name: web, labels: {version: 2}}
        spec:
          mounts: [{mountPoint: "https://example.com/files/"}]
        """)

    commands, _, errors = documents_to_commands(sample + docs)

    quote = " (put the value in quotes: unquoted, YAML reads true, 9000 or 0.5 as a boolean or a number)"
    assert commands == []
    assert errors == [
        'document 1 (Dataset my-s3): Expected `str`, got `array` - at `$.spec.mounts[0].options["encryptOptions"]`',
        "document 2 (Dataset minio): Expected `str`, got `bool` - at "
        f'`$.spec.mounts[1].options["alluxio.underfs.s3.disable.dns.buckets"]`{quote}',
        f'document 3 (Dataset web): Expected `str`, got `int` - at `$.metadata.labels["version"]`{quote}',
    ]


def test_missing_metadata_and_non_mapping_documents_are_errors() -> None:
    docs = load("""
        apiVersion: shoal.io/v1alpha1
        kind: Dataset
        spec: {}
        ---
        - just
        - a list
        ---
        ---
        apiVersion: shoal.io/v1alpha1
        kind: Runtime
        metadata: {namespace: x}
        """)

    commands, _, errors = documents_to_commands(docs)

    assert commands == []
    assert errors == [
        "document 1 (Dataset): metadata with a name is required",
        "document 2: expected a mapping with apiVersion, kind, metadata and spec, got list",
        # Document 3 is empty and skipped; positions keep counting.
        "document 4 (Runtime): Object missing required field `name` - at `$.metadata`",
    ]


def test_invalid_block_size_is_an_error_of_the_document() -> None:
    docs = load("""
        apiVersion: data.fluid.io/v1alpha1
        kind: AlluxioRuntime
        metadata: {name: a}
        spec:
          properties: {alluxio.user.block.size.bytes.default: lots}
        """)

    commands, _, errors = documents_to_commands(docs)

    assert commands == []
    assert errors == ["document 1 (AlluxioRuntime a): spec.properties[\"alluxio.user.block.size.bytes.default\"]: "
                      "'lots' is not a size (examples: 4MB, 64MB, 1GB)"]


def test_an_engine_block_size_above_shoals_largest_block_is_the_largest_with_a_note() -> None:
    """Fluid's FAQ suggests Alluxio's 256MB blocks for large files: mapped to ``blockSize: 256Mi``, the runtime
    service refused it naming ``spec.blockSize``, a field the manifest does not have. Shoal's largest block serves
    the same intent; a size no Fluid sample comes near (too small, not whole pages) is refused naming the
    engine's setting."""
    sample = parse_documents((FLUID_SAMPLES / "alluxio_faq_block_size.yaml").read_text())
    docs = load("""
        apiVersion: data.fluid.io/v1alpha1
        kind: JuiceFSRuntime
        metadata: {name: tiny}
        spec:
          tieredstore: {levels: [{mediumtype: MEM, quota: 1Gi}]}
          fuse: {options: {block-size: "16"}}
        ---
        apiVersion: data.fluid.io/v1alpha1
        kind: GooseFSRuntime
        metadata: {name: odd}
        spec:
          tieredstore: {levels: [{mediumtype: MEM, quota: 1Gi}]}
          properties: {goosefs.user.block.size.bytes.default: 100000}
        """)

    commands, notes, errors = documents_to_commands(sample + docs)

    (runtime,) = commands
    assert isinstance(runtime.event, RuntimeApply)
    assert runtime.event.runtime.spec.block_size == "64Mi"
    assert validate_runtime(runtime.event.runtime) == []
    assert 'ignored: AlluxioRuntime default/hbase: spec.properties["alluxio.user.block.size.bytes.default"] ' \
           "('256MB' is more than Shoal's largest block: blocks of 64Mi)" in notes
    assert errors == [
        "document 2 (JuiceFSRuntime tiny): spec.fuse.options[\"block-size\"] '16' is not a block size Shoal takes: "
        "a multiple of 4Ki from 64Ki to 64Mi (e.g. 4MB)",
        "document 3 (GooseFSRuntime odd): spec.properties[\"goosefs.user.block.size.bytes.default\"] 100000 is not a "
        "block size Shoal takes: a multiple of 4Ki from 64Ki to 64Mi (e.g. 4MB)",
    ]


@pytest.mark.parametrize(("value", "expected"), [
    ("64MB", 64 * 2**20), ("1GB", 2**30), ("512KB", 512 * 2**10), ("16m", 16 * 2**20), (67108864, 2**26),
    ("1.5MB", 3 * 2**19),
])
def test_alluxio_sizes_are_binary(value: object, expected: int) -> None:
    assert alluxio_size(value) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("4096", 4 * 2**20), (1024, 2**20), ("4M", 4 * 2**20), ("4MiB", 4 * 2**20), ("512K", 512 * 2**10),
])
def test_juicefs_plain_numbers_are_kib(value: object, expected: int) -> None:
    assert juicefs_size(value) == expected


@pytest.mark.parametrize("value", ["", "lots", "0", "-1MB", True, "0.3B"])
def test_bad_sizes_are_refused(value: object) -> None:
    with pytest.raises(ValueError):
        alluxio_size(value)


def test_yaml_errors_name_the_document_and_the_line() -> None:
    text = "apiVersion: v1\nkind: A\n---\napiVersion: v1\nkind: [unclosed\nmetadata: {}\n"

    with pytest.raises(ManifestError) as caught:
        parse_documents(text)

    assert str(caught.value) == ("invalid YAML in document 2, line 6, column 9: expected ',' or ']', but got ':' "
                                 "(while parsing a flow sequence)")


def test_a_key_given_twice_is_an_error_not_the_last_one_silently() -> None:
    # PyYAML keeps the last value: this dataset would have been applied as "b" in namespace prod, mounting two/.
    text = textwrap.dedent("""
        apiVersion: shoal.io/v1alpha1
        kind: Dataset
        metadata: {name: a}
        spec:
          mounts: [{mountPoint: s3://one/}]
          mounts: [{mountPoint: s3://two/}]
        metadata: {name: b, namespace: prod}
        """)

    with pytest.raises(ManifestError) as caught:
        parse_documents(text)

    assert str(caught.value) == ("invalid YAML in document 1, line 8, column 1: duplicate key 'metadata' (first on "
                                 "line 4)")
    with pytest.raises(ManifestError, match=r"line 7, column 3: duplicate key 'mounts' \(first on line 6\)"):
        parse_documents(text.replace("metadata: {name: b, namespace: prod}", ""))
    with pytest.raises(ManifestError, match=r"document 2, line 3, column 10: duplicate key 'a' \(first on line 3\)"):
        parse_documents('{"a": 1}\n---\n{"a": 1, "a": 2}\n')  # JSON too
    # A merge key's values may be overridden: that is what it is for.
    assert parse_documents("base: &b {k: 1, j: 2}\nmine: {<<: *b, k: 3}\n") == [
        {"base": {"k": 1, "j": 2}, "mine": {"k": 3, "j": 2}}]


def test_json_is_read_as_kubectl_reads_it_not_as_yaml() -> None:
    """A text beginning with ``{`` is JSON, as kubectl's decoder takes it. Read as YAML 1.1, a file indented with tabs
    (Go's ``json.MarshalIndent(v, "", "\\t")``, ``jq --tab``) was "found character '\\t' that cannot start any
    token", an emoji as ``json.dumps`` escapes it was refused as two lone surrogates, and objects one after another
    (``jq '.items[]'``) were "expected '<document start>'"."""
    dataset = {"apiVersion": SHOAL_API, "kind": "Dataset", "metadata": {"name": "a", "annotations": {"by": "😀"}},
               "spec": {"mounts": [{"mountPoint": "s3://one/"}]}}
    tabs = json.dumps(dataset, indent="\t", ensure_ascii=False)
    escaped = json.dumps(dataset)  # ensure_ascii: "\\ud83d\\ude00"
    assert "\\ud83d\\ude00" in escaped
    other = {**dataset, "metadata": {"name": "b"}}

    assert parse_documents(tabs) == [dataset]
    assert parse_documents(escaped) == [dataset]
    assert parse_documents(f"\ufeff{escaped}\n{json.dumps(other)}  \n") == [dataset, other]  # a BOM, a stream
    commands, _, errors = documents_to_commands(parse_documents(f"{escaped}{json.dumps(other)}"))
    assert errors == [] and [command.name for command in commands] == ["a", "b"]
    assert isinstance(commands[0].event, DatasetApply)
    assert commands[0].event.dataset.metadata.annotations == {"by": "😀"}
    # What JSON cannot read is read as YAML, which names the line: a key given twice, a syntax error, YAML's
    # document separator between JSON objects.
    with pytest.raises(ManifestError, match=r"line 1, column 10: duplicate key 'a'"):
        parse_documents('{"a": 1, "a": 2}')
    with pytest.raises(ManifestError, match=r"invalid YAML in document 1, line 2"):
        parse_documents('{"a": [1,\n')
    assert parse_documents('{"a": 1}\n---\n{"b": 2}\n') == [{"a": 1}, {"b": 2}]


def test_a_command_too_large_for_a_nats_message_is_said_with_its_size() -> None:
    [command], _, _ = documents_to_commands([{"apiVersion": SHOAL_API, "kind": "Dataset", "metadata": {"name": "a"},
                                              "spec": {"mounts": [{"mountPoint": "s3://one/"}]}}])
    size = len(msgspec.json.encode(command.event))

    assert too_large(command.event, "Dataset", size + COMMAND_HEADROOM) == ""
    assert too_large(command.event, "Dataset", size + COMMAND_HEADROOM - 1) == (
        f"too large for Shoal: its command would be {size} bytes, more than the {size - 1} a NATS message can carry "
        "here; split it into several Datasets (fewer mounts or targets each)")


def test_a_command_larger_than_the_services_take_is_said_with_the_setting_that_raises_their_limit() -> None:
    """A command between SHOAL_MAX_EVENT_BYTES (256 KiB) and NATS's 1 MiB was published, and the service refused it
    with only its size and the limit."""
    [command], _, _ = documents_to_commands([{"apiVersion": SHOAL_API, "kind": "Dataset", "metadata": {"name": "a"},
                                              "spec": {"mounts": [{"mountPoint": "s3://one/"}]}}])
    size = len(msgspec.json.encode(command.event))

    assert too_large(command.event, "Dataset", size + COMMAND_HEADROOM, event_limit=size) == ""
    assert too_large(command.event, "Dataset", size + COMMAND_HEADROOM, event_limit=size - 1) == (
        f"too large for Shoal: its command would be {size} bytes, more than the {size - 1} the services take "
        "(SHOAL_MAX_EVENT_BYTES); split it into several Datasets (fewer mounts or targets each), or raise "
        "SHOAL_MAX_EVENT_BYTES for the services and here alike")
    # Over both: NATS's limit is said, which no setting of Shoal's raises.
    assert "a NATS message can carry" in too_large(command.event, "Dataset", size, event_limit=size - 1)


def test_aliases_that_expand_past_a_command_or_contain_themselves_are_refused() -> None:
    """Ten lines of aliases, each repeating the one before ten times, expand to ten billion values: the CLI ate
    memory until it was killed; an alias inside its own anchor was a RecursionError traceback. kubectl refuses
    both."""
    laughs = "\n".join(f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 11))
    head = "apiVersion: shoal.io/v1alpha1\nkind: Dataset\nmetadata: {name: a}\nspec:\n  mounts: [{mountPoint: s3://b/}]\n"

    _, _, [error] = documents_to_commands(parse_documents(f"{head}  nodeAffinity:\n    l0: &l0 [lol]\n{laughs}\n"))
    assert error == ("document 1: its aliases (*name) repeat so much that it would hold more than 1,048,576 values, "
                     "more than a command can carry: write the repeated parts out, or split it")
    for itself in ("  nodeAffinity: &a {x: *a}\n", "  tolerations: &a [{x: *a}]\n"):
        _, _, [error] = documents_to_commands(parse_documents(head + itself))
        assert error == ("document 1: it contains itself: an alias (*name) inside the mapping or list its anchor "
                         "(&name) names")
    # Aliases used as they usually are (a shared mapping, a deep tree shared twice) are fine.
    shared = "  nodeAffinity:\n    a: &x {k: [1, 2, {z: [3]}]}\n    b: *x\n    c: [*x, *x]\n"
    [command], _, errors = documents_to_commands(parse_documents(head + shared))
    assert errors == [] and isinstance(command.event, DatasetApply)
    assert command.event.dataset.spec.node_affinity == {"a": {"k": [1, 2, {"z": [3]}]}, "b": {"k": [1, 2, {"z": [3]}]},
                                                        "c": [{"k": [1, 2, {"z": [3]}]}] * 2}


def test_empty_documents_keep_their_positions() -> None:
    assert parse_documents("a: 1\n---\n---\nb: 2\n") == [{"a": 1}, None, {"b": 2}]


# --- DataLoad and DataClean ---

# A Fluid DataLoad as Fluid's docs and samples write them (warm-up with replicas, metadata sync, a runAfter with
# an affinity strategy), plus every field that only Fluid's loader Job would use.
FLUID_DATALOAD = """
    apiVersion: data.fluid.io/v1alpha1
    kind: DataLoad
    metadata:
      name: spark-dataload
      namespace: ml
    spec:
      dataset:
        name: spark
      loadMetadata: true
      target:
        - path: /spark/spark-2.4.7
          replicas: 1
        - path: /spark/spark-3.0.1/pyspark-3.0.1.tar.gz
          replicas: 2
      policy: Cron
      schedule: "*/30 * * * *"
      runAfter:
        apiVersion: data.fluid.io/v1alpha1
        kind: DataLoad
        name: spark-meta
        affinityStrategy:
          policy: Require
      ttlSecondsAfterFinished: 300
      options: {atomicCache: "true"}
      podMetadata: {labels: {team: ml}}
      affinity: {nodeAffinity: {}}
      nodeSelector: {disk: ssd}
      tolerations: [{key: gpu, operator: Exists}]
      schedulerName: volcano
      imagePullSecrets: [{name: registry}]
      resources: {limits: {cpu: "1"}}
    status:
      phase: Complete
    """


def test_fluid_dataload_applies_unchanged_and_notes_what_only_a_job_would_use() -> None:
    commands, notes, errors = documents_to_commands(load(FLUID_DATALOAD))

    assert errors == []
    [command] = commands
    assert (command.kind, command.source_kind, command.name, command.namespace, command.subject) == (
        "dataload", "DataLoad", "spark-dataload", "ml", subjects.DATALOAD_APPLY)
    assert command.resource == "dataload.shoal.io/spark-dataload"
    assert isinstance(command.event, DataLoadApply)
    assert command.event.data_load == DataLoad(
        metadata=ObjectMeta(name="spark-dataload", namespace="ml"),
        spec=DataLoadSpec(
            # No namespace in spec.dataset: the DataLoad's own, as in Fluid.
            dataset=DatasetRef(name="spark", namespace="ml"),
            load_metadata=True,
            target=[TargetPath(path="/spark/spark-2.4.7", replicas=1),
                    TargetPath(path="/spark/spark-3.0.1/pyspark-3.0.1.tar.gz", replicas=2)],
            policy="Cron",
            schedule="*/30 * * * *",
            run_after=OperationRef(kind="DataLoad", name="spark-meta"),
            ttl_seconds_after_finished=300,
        ),
    )
    assert sorted(notes) == sorted([
        "ignored: DataLoad ml/spark-dataload: status (status is computed by Shoal)",
        *(f"ignored: DataLoad ml/spark-dataload: spec.{field} (not used by Shoal)" for field in (
            "runAfter.apiVersion", "runAfter.affinityStrategy", "options", "podMetadata", "affinity",
            "nodeSelector", "tolerations", "schedulerName", "imagePullSecrets", "resources")),
    ])


def test_fluid_sample_dataload_needs_only_a_dataset() -> None:
    text = """
        apiVersion: data.fluid.io/v1alpha1
        kind: DataLoad
        metadata: {name: spark-dataload}
        spec:
          dataset: {name: spark, namespace: default}
        """
    [command], notes, errors = documents_to_commands(load(text))

    assert (notes, errors) == ([], [])
    assert isinstance(command.event, DataLoadApply)
    spec = command.event.data_load.spec
    assert (spec.dataset, spec.target, spec.policy, spec.load_metadata) == (
        DatasetRef(name="spark", namespace="default"), [], "Once", False)


def test_shoal_dataload_and_dataclean_and_their_deletes() -> None:
    text = """
        apiVersion: shoal.io/v1alpha1
        kind: DataLoad
        metadata: {name: warm}
        spec:
          dataset: {name: demo, namespace: data}
          target: [{path: /train/images, replicas: 2}]
          policy: OnEvent
          colour: blue
        ---
        apiVersion: shoal.io/v1alpha1
        kind: DataClean
        metadata: {name: cool, namespace: data}
        spec:
          dataset: {name: demo}
          target: [{path: /train/images}]
          runAfter: {kind: DataLoad, name: warm}
        """
    commands, notes, errors = documents_to_commands(load(text))

    assert errors == []
    assert notes == ["ignored: DataLoad default/warm: spec.colour (unknown field)"]
    warm, cool = commands
    assert isinstance(warm.event, DataLoadApply) and isinstance(cool.event, DataCleanApply)
    assert warm.event.data_load.spec.dataset == DatasetRef(name="demo", namespace="data")
    assert warm.event.data_load.spec.policy == "OnEvent"
    assert (cool.kind, cool.subject, cool.resource) == ("dataclean", subjects.DATACLEAN_APPLY,
                                                        "dataclean.shoal.io/cool")
    assert cool.event.data_clean.spec == DataCleanSpec(
        dataset=DatasetRef(name="demo", namespace="data"), target=[CleanTarget(path="/train/images")],
        run_after=OperationRef(kind="DataLoad", name="warm"))

    deletes, _, errors = documents_to_commands(load(text), action="delete")
    assert errors == []
    assert [(c.subject, c.event) for c in deletes] == [
        (subjects.DATALOAD_DELETE, DataLoadDelete(name="warm", namespace="default", id=deletes[0].event.id)),
        (subjects.DATACLEAN_DELETE, DataCleanDelete(name="cool", namespace="data", id=deletes[1].event.id)),
    ]


def test_replicas_on_a_datacleans_target_is_an_ignored_unknown_field() -> None:
    # A clean evicts every copy of its targets' blocks: ``replicas`` is no field of its targets, and a manifest that
    # still writes one is told it is ignored, as for any unknown field, not rejected.
    text = """
        apiVersion: shoal.io/v1alpha1
        kind: DataClean
        metadata: {name: cool}
        spec:
          dataset: {name: demo}
          target: [{path: /train/images, replicas: 2}]
        """
    [command], notes, errors = documents_to_commands(load(text))

    assert errors == []
    assert notes == ["ignored: DataClean default/cool: spec.target[0].replicas (unknown field)"]
    assert isinstance(command.event, DataCleanApply)
    assert command.event.data_clean.spec.target == [CleanTarget(path="/train/images")]


@pytest.mark.parametrize(("spec", "error"), [
    ("{}", "Object missing required field `dataset` - at `$.spec`"),
    ("{dataset: {name: demo}, policy: Sometimes}",
     "spec.policy 'Sometimes' is not one of Once, Cron, OnEvent"),
    ("{dataset: {name: demo}, target: [{replicas: 2}]}",
     "Object missing required field `path` - at `$.spec.target[0]`"),
    ("{dataset: {name: demo}, target: /train}", "Expected `array`, got `str` - at `$.spec.target`"),
    ("{dataset: {name: demo}, ttlSecondsAfterFinished: soon}", "Expected `int | null`, got `str`"),
    ("[dataset]", "spec must be a mapping, got list"),
])
def test_bad_dataloads_name_the_document_and_the_path(spec: str, error: str) -> None:
    text = f"apiVersion: data.fluid.io/v1alpha1\nkind: DataLoad\nmetadata: {{name: bad}}\nspec: {spec}\n"

    commands, _, errors = documents_to_commands(parse_documents(text))

    assert commands == []
    [message] = errors
    assert message.startswith("document 1 (DataLoad bad): ")
    assert error in message


@pytest.mark.parametrize(("api_version", "kind", "hints"), [
    (SHOAL_API, "dataset", "; 'dataset' is not a kind of shoal.io/v1alpha1: did you mean Dataset?"),
    ("data.fluid.io/v1alpha1", "DATALOAD", "; 'DATALOAD' is not a kind of data.fluid.io/v1alpha1: did you mean "
                                           "DataLoad?"),
    ("data.fluid.io/v1alpha", "Dataset", "; 'data.fluid.io/v1alpha' is not an apiVersion Shoal reads: did you mean "
                                         "data.fluid.io/v1alpha1?"),
    ("shoal.io/v1", "Datset", "; 'shoal.io/v1' is not an apiVersion Shoal reads: did you mean shoal.io/v1alpha1?; "
                              "'Datset' is not a kind of shoal.io/v1alpha1: did you mean Dataset?"),
    ("data.fluid.io/v1alpha1", "Runtime", "; Runtime is a kind of shoal.io/v1alpha1, not of data.fluid.io/v1alpha1"),
    ("v1", "ConfigMap", ""),
], ids=["lower-case-kind", "upper-case-kind", "short-api-version", "both", "other-apis-kind", "nothing-close"])
def test_a_miscased_or_misspelt_kind_or_api_version_is_refused_with_what_was_meant(api_version: str, kind: str,
                                                                                  hints: str) -> None:
    """``kind: dataset`` or ``apiVersion: data.fluid.io/v1alpha`` was refused with the list of every supported kind
    and no word of which one was meant, where a misspelt field gets "did you mean"."""
    document = {"apiVersion": api_version, "kind": kind, "metadata": {"name": "x"}, "spec": {}}

    commands, _, [error] = documents_to_commands([document])

    assert commands == []
    supported = (f"document 1 ({kind} x): unknown kind {kind!r} of apiVersion {api_version!r}; supported: Dataset, "
                 "Runtime, DataLoad and DataClean of shoal.io/v1alpha1, Dataset, DataLoad and AlluxioRuntime, "
                 "JuiceFSRuntime, JindoRuntime, GooseFSRuntime, EFCRuntime, ThinRuntime, VineyardRuntime of "
                 "data.fluid.io/v1alpha1")
    assert error == supported + hints


def test_fluid_has_no_dataclean() -> None:
    text = "apiVersion: data.fluid.io/v1alpha1\nkind: DataClean\nmetadata: {name: c}\nspec: {dataset: {name: d}}\n"

    commands, _, [error] = documents_to_commands(parse_documents(text))

    assert commands == []
    assert error.startswith("document 1 (DataClean c): unknown kind 'DataClean' of apiVersion "
                            "'data.fluid.io/v1alpha1'; supported: Dataset, Runtime, DataLoad and DataClean of "
                            "shoal.io/v1alpha1")


def test_a_lone_surrogate_in_a_yaml_escape_is_an_error_that_does_not_quote_it() -> None:
    """PyYAML turns "\\ud800" into a lone surrogate, which no UTF-8 event can carry (found by fuzzing: the bridge
    and the CLI crashed encoding it)."""
    documents = load(textwrap.dedent('''
        apiVersion: data.fluid.io/v1alpha1
        kind: Dataset
        metadata: {name: odd}
        spec:
          mounts: [{mountPoint: "s3://bucket/\\ud800secret"}]
    '''))
    commands, _, errors = documents_to_commands(documents)
    assert commands == []
    assert errors == ["document 1: holds text that is not valid Unicode (a lone surrogate)"]


def test_a_list_stands_for_its_items_which_keep_the_lists_position() -> None:
    docs = load("""
        apiVersion: shoal.io/v1alpha1
        kind: Runtime
        metadata: {name: first}
        spec: {tieredstore: {levels: [{mediumtype: MEM, quota: 1Gi}]}}
        ---
        apiVersion: v1
        kind: List
        metadata: {resourceVersion: ""}
        selfLink: /api/v1
        items:
          - apiVersion: data.fluid.io/v1alpha1
            kind: DataLoad
            metadata: {name: warm, namespace: ml}
            spec: {dataset: {name: imagenet}}
          - apiVersion: shoal.io/v1alpha1
            kind: DataClean
            metadata: {name: cool}
        """)

    commands, notes, errors = documents_to_commands(docs, action="delete")

    assert [(c.document, c.kind, c.namespace, c.name, c.subject) for c in commands] == [
        (1, "runtime", "default", "first", subjects.RUNTIME_DELETE),
        (2, "dataload", "ml", "warm", subjects.DATALOAD_DELETE)]
    assert errors == ["document 2, item 2 (DataClean cool): Object missing required field `dataset` - at `$.spec`"]
    assert notes == ["ignored: List/selfLink (not used by Shoal)"]


@pytest.mark.parametrize("spec", ["spec: {}", "", "spec: {tieredstore: {levels: []}}"])
def test_a_thin_runtime_without_a_tier_has_no_cache_worker(spec: str) -> None:
    """Fluid's ThinRuntime caches nothing (a reference dataset's is served by its source's runtime): zero replicas,
    which the runtime service accepts without a tier. Given replicas or tiers, it maps as any runtime."""
    commands, notes, errors = documents_to_commands(load(
        f"apiVersion: data.fluid.io/v1alpha1\nkind: ThinRuntime\nmetadata: {{name: refdemo}}\n{spec}\n"))
    assert (errors, notes) == ([], [])
    [command] = commands
    assert isinstance(command.event, RuntimeApply)
    assert command.event.runtime.spec.replicas == 0 and validate_runtime(command.event.runtime) == []
    commands, _, _ = documents_to_commands(load(
        "apiVersion: data.fluid.io/v1alpha1\nkind: ThinRuntime\nmetadata: {name: thin}\n"
        "spec: {tieredstore: {levels: [{mediumtype: MEM, quota: 1Gi}]}}\n"))
    assert isinstance(commands[0].event, RuntimeApply) and commands[0].event.runtime.spec.replicas == 1


def test_null_fields_are_left_out_as_the_api_server_prunes_them() -> None:
    # What a Helm template renders for a value it was not given (``namespace: {{ .Values.ns }}``), or a key left
    # empty by hand: kubectl and the API server take a null field of a custom resource as absent (pruned before
    # defaulting), so the default applies; it was "Expected `object`, got `null`".
    docs = load("""
        apiVersion: data.fluid.io/v1alpha1
        kind: Dataset
        metadata:
          name: demo
          namespace:
          labels:
          annotations:
        spec:
          mounts:
            - mountPoint: s3://demo/train/
              options:
          nodeAffinity:
        ---
        apiVersion: data.fluid.io/v1alpha1
        kind: AlluxioRuntime
        metadata: {name: demo, namespace: ""}
        spec:
          replicas:
          tieredstore:
            levels:
              - {mediumtype: MEM, quota: 1Gi, high: null, low: ~}
        ---
        apiVersion: data.fluid.io/v1alpha1
        kind: DataLoad
        metadata: {name: warm, namespace: ml}
        spec:
          dataset: {name: demo, namespace: null}
          target:
          policy:
        """)

    commands, notes, errors = documents_to_commands(docs, default_namespace="team-a")

    assert (notes, errors) == ([], [])
    dataset, runtime, dataload = commands
    assert isinstance(dataset.event, DatasetApply) and isinstance(runtime.event, RuntimeApply)
    assert isinstance(dataload.event, DataLoadApply)
    assert (dataset.namespace, runtime.namespace, dataload.namespace) == ("team-a", "team-a", "ml")
    assert dataset.event.dataset.metadata.labels == {} and dataset.event.dataset.spec.mounts[0].options == {}
    assert runtime.event.runtime.spec.replicas == 1
    assert runtime.event.runtime.spec.tieredstore.levels == [Level(mediumtype="MEM", quota="1Gi")]
    # A DataLoad's dataset without a namespace is in the DataLoad's, null or empty as absent.
    assert dataload.event.data_load.spec.dataset == DatasetRef(name="demo", namespace="ml")
    assert dataload.event.data_load.spec.policy == "Once"


def test_a_null_in_a_list_is_still_an_error_naming_its_place() -> None:
    docs = load("""
        apiVersion: shoal.io/v1alpha1
        kind: Dataset
        metadata: {name: demo}
        spec:
          mounts: [null]
        """)

    assert documents_to_commands(docs)[2] == [
        "document 1 (Dataset demo): Expected `object`, got `null` - at `$.spec.mounts[0]`"]


def test_a_namespace_given_with_n_is_enforced_as_kubectl_does() -> None:
    # ``shoal delete -f staging.yaml -n prod`` deleted staging's objects without a word (and apply applied them
    # there): kubectl refuses a document whose namespace does not match the -n it was given.
    docs = load("""
        apiVersion: shoal.io/v1alpha1
        kind: Dataset
        metadata: {name: demo, namespace: staging}
        spec: {mounts: [{mountPoint: "s3://demo/"}]}
        ---
        apiVersion: shoal.io/v1alpha1
        kind: Runtime
        metadata: {name: demo}
        spec: {tieredstore: {levels: [{mediumtype: MEM, quota: 1Gi}]}}
        ---
        apiVersion: shoal.io/v1alpha1
        kind: Runtime
        metadata: {name: other, namespace: prod}
        spec: {tieredstore: {levels: [{mediumtype: MEM, quota: 1Gi}]}}
        """)

    for action in ("apply", "delete"):
        commands, _, errors = documents_to_commands(docs, default_namespace="prod", action=action,
                                                    enforce_namespace=True)
        assert [(c.name, c.namespace) for c in commands] == [("demo", "prod"), ("other", "prod")]
        assert errors == ["document 1 (Dataset demo): its namespace 'staging' does not match -n prod: give -n "
                          "staging, or leave -n out"]
    # Without -n, the document's namespace wins (the default is only for documents naming none).
    commands, _, errors = documents_to_commands(docs, default_namespace="prod")
    assert errors == [] and [c.namespace for c in commands] == ["staging", "prod", "prod"]


DECIMAL_QUOTAS = """
    apiVersion: %s
    kind: %s
    metadata: {name: decimals}
    spec:
      blockSize: 4194304.0
      tieredstore:
        levels:
          - {mediumtype: MEM, quota: 1.5}
          - {mediumtype: SSD, path: /mnt/ssd, quota: 1073741824.5}
          - {mediumtype: HDD, path: /mnt/hdd, quotaList: 2.5e+9}
    """


@pytest.mark.parametrize(("api_version", "kind"), [("shoal.io/v1alpha1", "Runtime"),
                                                   ("data.fluid.io/v1alpha1", "AlluxioRuntime")])
def test_a_quantity_written_as_a_number_with_decimals_is_the_quantity_it_spells(api_version: str, kind: str) -> None:
    """Kubernetes' Quantity takes a JSON number (``quota: 1.5``) as the quantity it spells, and a byte count rounds
    a fraction of a byte up, as the text "1.5" is read. Before, msgspec refused it with "Expected `int | str`, got
    `float` - at `$.spec.tieredstore.levels[0].quota`"."""
    text = DECIMAL_QUOTAS % (api_version, kind)
    if kind == "Runtime":  # Shoal's own Runtime has no quotaList without a quota: give both
        text = text.replace("quotaList: 2.5e+9", "quota: 2.5e+9")
    commands, _, errors = documents_to_commands(load(text))

    assert errors == []
    assert isinstance(commands[0].event, RuntimeApply)
    spec = commands[0].event.runtime.spec
    assert [parse_quantity(level.quota) for level in spec.tieredstore.levels] == [2, 2**30 + 1, 2_500_000_000]
    assert [level.quota for level in spec.tieredstore.levels[:2]] == ["1.5", "1073741824.5"]  # as "1.5" would be
    assert parse_quantity(spec.block_size) == 4 * 2**20


def test_an_infinite_quota_is_refused_naming_its_field() -> None:
    _, _, errors = documents_to_commands(load("""
        apiVersion: shoal.io/v1alpha1
        kind: Runtime
        metadata: {name: endless}
        spec:
          tieredstore:
            levels: [{mediumtype: MEM, quota: .inf}]
        """))

    assert errors == ["document 1 (Runtime endless): spec.tieredstore.levels[0].quota inf is not a size: write a "
                      "quantity such as 100Gi"]
