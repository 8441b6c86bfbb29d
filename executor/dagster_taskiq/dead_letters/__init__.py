"""Dead letters: what the DLQ Lambda does with a step that ran out of deliveries."""
