"""deploy-agent: a small, durable deployment daemon."""

__version__ = "0.1.0"
