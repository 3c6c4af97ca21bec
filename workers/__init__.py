"""Ray layer (imports scdd and api_schema): the pipeline's Ray backend (backend.py) with distributed
recover (recover.py) and Ray Train stages (train.py), and the job driver (driver.py) with its events
(events.py) and per-job control actor (control.py).

docs/architecture.md describes the layers; docs/distributed.md what runs where.
"""
