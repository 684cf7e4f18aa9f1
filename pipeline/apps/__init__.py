"""What users run on a finished checkpoint: the terminal chat, the HTTP server, the run report."""
