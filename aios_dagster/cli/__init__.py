"""The `aios` command line: the operator's terminal for runs, approvals and configuration."""
