"""Webhooks: a job's final status, signed (Standard Webhooks) and sent to its ``webhook_url``.

The API validates URLs and manages each owner's signing secret; the final status of a job writes a
message to the outbox (``webhook_messages``) in the same transaction; the worker process sends it
(``worker/webhooks.py``)."""
