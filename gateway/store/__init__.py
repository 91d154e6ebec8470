"""The traffic store: every exchange recorded in SQL, off the response path, never lost."""

from gateway.store.records import ExchangeRecord
from gateway.store.writer import TrafficStore

__all__ = ["ExchangeRecord", "TrafficStore"]
