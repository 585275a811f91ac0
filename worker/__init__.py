"""The Celery worker: one task that takes a job id and runs the LaFTer pipeline (see pipeline.py)."""
