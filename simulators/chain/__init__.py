"""A deterministic CometBFT chain simulator: JSON-RPC over HTTP and a WebSocket (see server.py)."""
