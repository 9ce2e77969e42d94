"""Bridges to peer libraries, for agreement and speed comparisons (optional extras)."""
