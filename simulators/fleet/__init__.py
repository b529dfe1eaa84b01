"""A deterministic fleet gateway simulator (see server.py)."""
