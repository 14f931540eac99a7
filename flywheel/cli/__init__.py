"""The `flywheel` command. Each command group lives in its own module."""
