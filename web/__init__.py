"""HTTP plumbing shared by every Retrainer process that listens: binding and running uvicorn,
the one error → HTTP status table, and the small /healthz + /metrics app of the processes
that have no other port."""
