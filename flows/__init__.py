"""Prefect flows and tasks (thin wrappers over ml/domain/storage) and the trigger service."""
