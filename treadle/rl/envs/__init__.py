"""Registered environments: the registry, the dataset glue to the cookbook, and the envs themselves."""
