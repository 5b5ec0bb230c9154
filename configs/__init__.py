"""Config files: `get_config(arg)` returning an ml_collections ConfigDict (see each docstring)."""
