"""Outside content: feeds and notes read into screened source items, problems kept aside."""
