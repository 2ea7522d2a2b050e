"""Monitoring: capability regression (log-likelihood harness, paired check) and preference drift (Evidently)."""
