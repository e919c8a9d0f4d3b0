"""Flower ClientApp and mods: honest party, secure aggregation, DP-SGD, malicious participant."""
