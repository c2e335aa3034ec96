"""End-to-end scenarios: whole CLI runs in subprocesses, shipped recipes on a budget, signals, resume, examples."""
