"""Targets: where and how a deployment's work runs, one module per place.

`base` holds the Target protocol and what every target shares; `local_container`,
`local_process`, `remote_container` and `remote_process` are the places; `builds` the
builders they use; `server` one remote server's runtimes; `resolver` the `Targets` that
picks a deployment's target, once. The engine and the release manager call targets only through `base` and `resolver`.
"""
