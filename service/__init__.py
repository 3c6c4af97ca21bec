"""Job service layer: FastAPI app, Redis job store and queue, dispatcher to Ray Jobs (imports api_schema).

Its modules arrive with the job-service issue; the package is installed now so the layering in
DESIGN.md is fixed from the start.
"""
