"""Parameter-efficient methods that hook into the frozen encoder: bottleneck adapters today."""
