"""SQL migrations of the vendors' database, applied in file-name order by migrate.py."""
