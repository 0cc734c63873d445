"""locallearn: local learning of deep networks as chains of gradient-isolated stages."""
