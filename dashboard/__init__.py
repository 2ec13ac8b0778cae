"""Panel dashboard over the run store: ``panel serve dashboard`` (see dashboard/main.py)."""
