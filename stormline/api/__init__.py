"""The HTTP API (`stormline api`): FastAPI over the log, with keys, roles and tenants."""
