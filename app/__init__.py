"""The LaFTer adaptation service: FastAPI API over the ``lafter`` library (see README.md, "The service")."""
