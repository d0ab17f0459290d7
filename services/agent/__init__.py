"""Node agent: heartbeats, one FUSE mount process per Bound dataset, the block cache and inventory."""
