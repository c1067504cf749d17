"""A run on disk and around it: the run-folder contract (`folder`: manifest, lock, checkpoints, metrics, the
adapter that serves a region), injected faults for simulations (`faults`), and deployment credentials
(`deployment`)."""
