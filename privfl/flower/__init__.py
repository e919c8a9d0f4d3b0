"""Adapters between privfl's Flower-free core and Flower: model updates as ArrayRecords
(:mod:`~privfl.flower.records`), secure aggregation's message format
(:mod:`~privfl.flower.wire`) and an in-process Grid (:mod:`~privfl.flower.loopback`)."""
