"""Adapters between privfl's Flower-free core and Flower's records, messages and grids."""
