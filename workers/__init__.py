"""Ray layer: distributed recover, Ray Train validation and the job driver (imports scdd, api_schema).

Its modules arrive with the distributed-recover and job-driver issues; the package is installed
now so the layering in DESIGN.md is fixed from the start.
"""
