"""Prefect flows chaining the tasks, and the ``skmm`` command line."""
