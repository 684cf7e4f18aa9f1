"""Benchmarks of chatpipe's training loops; see bench/README.md."""
