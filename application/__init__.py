"""Servers on top of the engine: a Gradio web UI (`python -m application.webui`)
and an OpenAI-compatible HTTP API (`python -m application.api_server`)."""
