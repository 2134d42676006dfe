"""Stage 4, the network: UNet, losses, metrics, and the float32 copy that export and evaluation run."""
