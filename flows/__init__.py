"""Flows: datasets from feedback, method decisions, and the Prefect flows that run the loop."""
