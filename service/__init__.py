"""Job service layer (imports api_schema; only the Ray job entrypoint, entrypoint.py, imports workers):
the FastAPI app (api/), Redis job stores and queue, the dispatcher to Ray Jobs, `scdd serve` and the
client commands.

docs/architecture.md describes the layers; docs/service.md the API, the queue and the settings.
"""
