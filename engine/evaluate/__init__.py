"""Scoring atoms against a known structure: one-to-one matching and its metrics."""
