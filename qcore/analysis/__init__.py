"""What to choose: explanations, summaries, sensitivity sweeps, search, hardware rooflines."""
