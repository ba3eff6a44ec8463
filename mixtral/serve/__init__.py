"""`mixtral serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

`protocol` (requests, validation, errors), `render` (responses and stream chunks), `runner` (the
engine's thread, the bridge to asyncio, metrics), `app` (FastAPI endpoints and the chat page).
Needs the `serve` extra: fastapi, uvicorn, prometheus-client.
"""
