"""The fault toolkit: an S3 fault proxy, kill helpers, the node-loss scenarios, the bad-input table
and the soak that runs them all (`make chaos`)."""
