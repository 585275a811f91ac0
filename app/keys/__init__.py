"""API keys: who a request acts for. Stored hashed; created, listed and revoked with
``python -m app keys ...`` (see ``app.keys.cli``); checked by ``app.core.auth.current_owner``."""
