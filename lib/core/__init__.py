"""Plumbing every stage shares: params, layout, stores, streams, outputs, devices, ranks, the CLI.

Imports nothing of the project above it.
"""
