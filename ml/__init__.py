"""Torch code: model zoo, datasets, training loop, evaluation, quantization.

Imports domain and torch only; never Prefect, Kafka, boto3 or SQLAlchemy (import-linter checks it).
"""
