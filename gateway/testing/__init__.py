"""Test helpers: a fast local OpenAI-compatible teacher server."""
