"""The HTTP API (FastAPI). Imports api_schema and the service's Redis model; never torch."""
