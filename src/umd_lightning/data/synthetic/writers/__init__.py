"""One writer per publisher layout: ``write(root, n, size, rng)`` functions, registered in ``generate``."""
