"""Node agent: FUSE mounts and the block cache. Not built yet (roadmap step 2, the next issue)."""
