"""Inbound work: customer messages read from disk, deduplicated and batched into runs."""
