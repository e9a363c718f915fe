"""Generated from protos/internal/cutout/internal/v1 by protos/generate.py: do not edit."""
