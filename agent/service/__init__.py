"""The endpoint runtime: the ``run`` main loop, budgets, the status file and the service managers."""
