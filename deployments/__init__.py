"""Deployments of the curation flows on a standing Prefect server (schedules, work pools); see README.md here.

This package imports ``flows``; nothing in ``flows``, ``tasks``, ``storage`` or ``skmm`` imports it.
"""
