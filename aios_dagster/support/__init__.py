"""The support workflow's kernel side: customer tickets and the SLA they are held to."""
