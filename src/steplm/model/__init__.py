"""The LLaMA architecture: decoder, attention, fused head + loss. Architecture only."""
