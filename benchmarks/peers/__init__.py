"""Peer stacks of ``compare_peers.py`` that need code of their own (qwix's Flax model)."""
