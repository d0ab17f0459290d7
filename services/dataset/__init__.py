"""Dataset service: desired state, validation, metadata sync and status of Datasets (see README.md)."""
