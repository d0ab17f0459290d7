"""Runtime service: runtime specs, agent membership and readiness (see README.md)."""
