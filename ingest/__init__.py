"""Ingestion: feedback events from Kafka into DuckDB, exactly once; bad events quarantined with a reason."""
