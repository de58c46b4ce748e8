"""Shared test support: the KMS emulator, prerequisites for each tier, unique names."""
