"""Faithful test copies of the peer codebases that tempflow.compat replaces (see loader.py)."""
