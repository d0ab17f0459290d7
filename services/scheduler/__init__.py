"""Scheduler service: folds every node's inventory into where each dataset's bytes are, and scores nodes for work."""
