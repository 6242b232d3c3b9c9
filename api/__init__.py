"""HTTP API (CONTRACT section 3): triggers, runs and their decision records, models, rollouts, overrides.

- `app.create_app(...)`: the FastAPI application, dependencies passed in (no globals).
- `routes`: the routes; each owns its transaction and raises domain errors.
- `errors`: the one mapping from error code to HTTP status, and the one error body.
- `middleware`: API key (401), per-key rate limit (429), body size limit (413), before parsing.
- `schemas`: request and response bodies, as in /openapi.json.
- `server`: uvicorn in the foreground (`serve_api`) or in a thread (`running_api`).
- `client`: a small synchronous client for the CLI (`retrainer trigger --wait`).
"""
