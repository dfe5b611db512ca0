"""guardproxy: an OpenAI-compatible reverse proxy that keeps per-tenant LLM spend under budget."""

__version__ = "0.1.0"
