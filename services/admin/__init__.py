"""Operator tools that live with the services: `cutout-admin` (or `python -m services.admin`)."""
