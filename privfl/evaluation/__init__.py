"""Evaluators: they hold the ground truth an attacker never sees (which records are members,
what a party trained on) and score what an attack recovered."""
