"""Kubernetes names Shoal owns or reads, spelled once: API groups, the custom resource kinds and their plurals,
the finalizer, labels and annotations, and how a dataset's PersistentVolume and claim are named.

The CRDs in ``deploy/crds`` (generated), the bridge (``services/bridge``), the RBAC in ``deploy/`` and the tests all
take these from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from libs.documents import FLUID_API, FLUID_RUNTIME_KINDS, SHOAL_API

SHOAL_GROUP, SHOAL_VERSION = SHOAL_API.split("/")
FLUID_GROUP, FLUID_VERSION = FLUID_API.split("/")


@dataclass(frozen=True)
class Resource:
    """One custom resource type as the API server serves it."""

    group: str
    version: str
    kind: str
    plural: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{self.group}"


SHOAL_RESOURCES = (
    Resource(SHOAL_GROUP, SHOAL_VERSION, "Dataset", "datasets"),
    Resource(SHOAL_GROUP, SHOAL_VERSION, "Runtime", "runtimes"),
    Resource(SHOAL_GROUP, SHOAL_VERSION, "DataLoad", "dataloads"),
    Resource(SHOAL_GROUP, SHOAL_VERSION, "DataClean", "datacleans"),
)
FLUID_RESOURCES = (
    Resource(FLUID_GROUP, FLUID_VERSION, "Dataset", "datasets"),
    Resource(FLUID_GROUP, FLUID_VERSION, "DataLoad", "dataloads"),
    *(Resource(FLUID_GROUP, FLUID_VERSION, kind, kind.lower() + "s") for kind in FLUID_RUNTIME_KINDS),
)
RESOURCES = SHOAL_RESOURCES + FLUID_RESOURCES
# Operations the loader removes once finished and past their ``ttlSecondsAfterFinished``: the bridge then deletes
# their custom resource, as Fluid does (the only kinds it may delete: deploy/processes/bridge.yaml).
EXPIRING_KINDS = ("DataLoad", "DataClean")

# Held on every custom resource the bridge has turned into a command, so a delete waits for Shoal's clean-up.
FINALIZER = "shoal.io/cleanup"
# Set on the PersistentVolume and claim the bridge creates for a Bound dataset (and on nothing else).
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "shoal-bridge"
DATASET_LABEL = "shoal.io/dataset"
# The namespace Shoal's own processes run in (deploy/).
SYSTEM_NAMESPACE = "shoal-system"


def volume_name(namespace: str, dataset: str) -> str:
    """A dataset's PersistentVolume (cluster-scoped, so the namespace is part of the name, as in Fluid). Not unique:
    a-b/c and a/b-c give the same name, so the bridge checks whose a volume of that name is before using or deleting
    it (``services.bridge.domain.is_own_volume``)."""
    return f"{namespace}-{dataset}"


def claim_name(dataset: str) -> str:
    """A dataset's PersistentVolumeClaim, in the dataset's namespace: the dataset's own name, as in Fluid."""
    return dataset
