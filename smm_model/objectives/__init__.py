"""What training minimises and how the gradients are coordinated: task losses and confidence-guided gradient coordination."""
