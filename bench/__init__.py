"""Benchmarks of mail2blob on the local stack (``make bench``); scripts that print numbers, never
timed tests."""
