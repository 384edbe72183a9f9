"""What a valid config is: the schema of every group, checked when the config is composed."""
