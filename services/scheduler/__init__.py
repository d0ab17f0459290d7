"""Scheduler service: cache-aware scoring from node inventory. Not built yet (roadmap step 5)."""
