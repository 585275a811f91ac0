"""The web console: a single page app (plain JavaScript modules and CSS, no build step) served at
``/console``, built only on the public ``/v1`` API."""
