"""Serving every stored profile: the engine (torch only), the HTTP API (FastAPI only) and the Ray Serve
deployment (Ray Serve only)."""
