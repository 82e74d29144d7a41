"""A plugin module whose own code fails on import."""

raise KeyError("a setting this module needs is missing")
