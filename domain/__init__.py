"""Pure rules and schemas: entities, errors, settings, log context.

Imports only the standard library and pydantic (an import-linter contract checks it), so
everything here is testable with tiny in-memory inputs.
"""
