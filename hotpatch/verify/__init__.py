"""Verifying a package in the emulator: baseline + package computes what the patched image does.

May import ``apply`` (its transaction over the emulator backend), ``package``, ``diff``,
``analysis``, ``pe``.
"""
