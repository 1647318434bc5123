"""Planning and running builds: the DAG, keys, the one engine and its runners, the lockfile, the
no-op record, path checks and verify. Knows nothing of torch: steps do the math."""
