"""Job service layer: FastAPI app, Redis job store and queue, dispatcher to Ray Jobs (imports api_schema;
only the Ray job entrypoint, which runs inside the cluster, imports workers).

docs/architecture.md describes the layers; docs/service.md the API, the queue and the settings.
"""
