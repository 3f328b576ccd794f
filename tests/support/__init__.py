"""Helpers that several test modules (and scripts) import: real binaries, trains, signing keys.
"""
