"""The HTTP service: `python -m service` (see docs/SERVICE.md). `create_app(settings)` is in service.main."""
