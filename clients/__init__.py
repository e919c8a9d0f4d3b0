"""Flower ClientApp and client mods: honest party, secure aggregation, DP-SGD, malicious participant."""
