"""Helpers shared by several test files: stacks of processes, fakes, send helpers and the
Node upstreams the relay and benchmark tests run."""
