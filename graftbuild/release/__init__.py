"""What a release carries: eval gates, the model card, and exports to other tools (PEFT)."""
