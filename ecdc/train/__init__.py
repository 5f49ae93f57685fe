"""Training EnCodec models: data, losses, discriminator, loss balancer and the training loop.

Nothing here is needed for compression; ``ecdc train`` imports it on demand.
"""
