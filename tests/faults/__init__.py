"""Fault tests: the agent under Docker outages, full disks and the like, with real processes."""
