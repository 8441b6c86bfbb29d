"""Load and faults: the simulator, its jobs, the exactly-once verification and the pictures."""
