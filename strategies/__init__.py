"""Flower server strategies: secure aggregation, DP global update, curious and malicious servers."""
