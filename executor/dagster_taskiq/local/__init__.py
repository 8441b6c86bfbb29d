"""The local stack and the demo: the whole system on one machine, no AWS, no Docker."""
