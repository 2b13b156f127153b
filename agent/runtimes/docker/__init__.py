"""Docker as a place to run builds and releases, one module per job.

gateway (the client, its thread pools, labels), build, release, output (following a
release's output), images (and copying workspaces in and out); agent.runtimes.container
composes them into ContainerRuntime.
"""
