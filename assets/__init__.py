"""Workflows: one package per workflow, each an asset graph that reads as its business story."""
