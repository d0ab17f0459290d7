"""Loader service: DataLoad policies and cache operations. Not built yet (roadmap step 4)."""
