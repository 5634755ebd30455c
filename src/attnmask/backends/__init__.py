"""Attention backends: one module each, and the contract they share (``attnmask.backends.contract``)."""
