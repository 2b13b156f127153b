"""The HTTP API: an aiohttp application in front of the engine."""

from agent.api.app import create_app

__all__ = ["create_app"]
