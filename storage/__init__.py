"""Metadata in SQL (SQLAlchemy 2 ORM, repositories) and artifact stores (local, S3).

Repository functions take a Session, never commit, and return domain entities: the caller
(flow, route, consumer step) owns the transaction. Infrastructure errors are translated into
`domain.errors` once, here.
"""
