"""Attack algorithms: gradient inversion, imprint-layer extraction, membership inference."""
