"""Simulated environments: Meta-World (envs.metaworld)."""
