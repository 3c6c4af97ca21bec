"""Ray layer: distributed recover, the Ray Train stages, the job driver and its events (imports scdd, api_schema).

docs/architecture.md describes the layers; docs/distributed.md what runs where.
"""
