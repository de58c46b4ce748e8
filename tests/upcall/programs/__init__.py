"""Secrets bound to a program (issue 24) through the real upcall: the shared install and cgroups
in conftest.py, the names and the child's steps in bound.py."""
