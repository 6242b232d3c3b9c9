"""HTTP API: triggers, status, decision records."""
