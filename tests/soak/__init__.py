"""`make soak`: the fault and fuzz tests at soak strength, and the renderer of docs/reliability.md."""
