"""Scaling: the policy, the scaler the Lambda runs, its trigger and the simulator."""
