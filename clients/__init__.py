"""Switchboard clients: the command line, the Python SDK and the training kit."""
