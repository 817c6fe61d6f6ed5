"""Rules: the KQL subset engine (kql.py, pure), term matching (terms.py, pure) and the YAML loader (loader.py)."""
