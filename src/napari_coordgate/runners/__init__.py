"""Where work runs: a separate process (:mod:`.isolate`), a dask.distributed cluster (:mod:`.distributed`), a
terminal with progress bars (:mod:`.console`)."""
