"""Runtimes: the places a deployment's work runs (a Docker container today)."""
