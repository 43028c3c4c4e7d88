"""Text conditioning: prompt syntax, exact CLIP tokenization, long-prompt strategies, CLIP text encoders."""
