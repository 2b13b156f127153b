"""Runtimes: the places a deployment's work runs (Docker containers, host processes, a remote shell); targets combine them."""
