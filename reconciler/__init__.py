"""gleam-reconcile: keep etcd's task keys equal to the YAML manifests in a git checkout.

    gitsource (git I/O) ─> manifests (pure: YAML -> messages) ─┐
                                                               ├─> diff (pure) ─> sync (etcd)
    sync (etcd reads) ─────────────────────────────────────────┘
    state (pure: meta record names and codecs)   parsecache (parsed blobs by id, in .git)
    reconcile (one pass: guard, plan, apply, re-plan, record)   render (text and JSON)
    cli (flags, exit codes; `--once`)   daemon (the loop: watch, interval, drift, --pull)
    launch (the entry point: a parse worker started before the imports, then cli)

The entry point is `reconciler.launch:main`; `reconciler.cli.main` parses the flags and
runs a pass or the daemon; `reconciler.reconcile.run` is one pass for callers that hold
an etcd client already.
"""
