"""The 3D network: a residual 3D UNet for MRI whose slices are thicker than its pixels.

nnU-Net plans pooling per axis from the voxel spacing: an axis is pooled only while its spacing is
under about twice the finest one, so on thick-slice MRI the first stages pool in-plane only (1, 2, 2)
and the deeper ones, whose in-plane spacing has caught up with the slice thickness, pool all three
axes (2, 2, 2). Here `z_pools` says how many of the deepest stages pool along z. The blocks, norms and
output layers are the 2.5D UNet's (tfseg.model.unet), so the losses, the logits view that training
takes (unet.logits_model) and mixed precision (float32 sigmoids) work unchanged.
"""

import keras
from keras import layers, ops

from tfseg.errors import ConfigError
from tfseg.model.unet import block_function, check_layers


def pool_sizes(depth: int, z_pools: int) -> list[tuple[int, int, int]]:
    """(z, y, x) pooling of each stage, shallowest first: in-plane only, then the last z_pools stages in 3D."""
    return [(2 if level >= depth - z_pools else 1, 2, 2) for level in range(depth)]


def build_unet3d(input_shape: tuple = (None, None, None, 1), num_classes: int = 3, *, depth: int = 4,
                 z_pools: int = 2, base_filters: int = 32, block: str = "residual", norm: str = "batch",
                 dropout: float = 0.0, upsample: str = "transpose", name: str = "unet3d") -> keras.Model:
    """Build a 3D UNet mapping [B, D, H, W, C] scans in [0, 1] to [B, D, H, W, num_classes] probabilities.

    Fully convolutional when D, H, W are None: D must then be a multiple of 2**z_pools and H, W of
    2**depth (what data.patch_size checks). Stage i has base_filters * 2**i filters; the sigmoid output
    ("probs", after the "logits" conv) computes in float32 under any mixed-precision policy. upsample
    resize is nearest-neighbour (Keras has no trilinear upsampling layer).
    """
    check_layers(num_classes, base_filters, block, norm, dropout, upsample)
    if not (isinstance(depth, int) and depth >= 1 and isinstance(z_pools, int) and 0 <= z_pools <= depth):
        raise ConfigError(f"model: depth must be >= 1 and z_pools in 0..depth, got depth {depth!r}, "
                          f"z_pools {z_pools!r}")
    if len(input_shape) != 4:
        raise ConfigError(f"model: a 3D input_shape is (D, H, W, C), got {input_shape!r}")
    pools = pool_sizes(depth, z_pools)
    for size, factor, axis in zip(input_shape[:3], (2**z_pools, 2**depth, 2**depth), "DHW", strict=True):
        if size is not None and size % factor:
            raise ConfigError(f"model: input {axis} = {size} must be a multiple of {factor} (depth {depth}, "
                              f"z_pools {z_pools})")
    conv_block = block_function(block)

    def convs(x, filters, prefix):
        return conv_block(x, filters, norm=norm, dropout=dropout, prefix=prefix)

    inputs = keras.Input(shape=input_shape, name="scans")
    skips, x = [], inputs
    for level, pool in enumerate(pools):
        x = convs(x, base_filters * 2**level, f"enc{level}")
        skips.append(x)
        x = layers.MaxPooling3D(pool, name=f"enc{level}_pool")(x)
    x = convs(x, base_filters * 2**depth, "bottleneck")
    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        if upsample == "transpose":
            x = layers.Conv3DTranspose(filters, pools[level], strides=pools[level], name=f"dec{level}_up")(x)
        else:
            x = layers.UpSampling3D(pools[level], name=f"dec{level}_up")(x)
        x = layers.Concatenate(name=f"dec{level}_concat")([x, skips[level]])
        x = convs(x, filters, f"dec{level}")
    logits = layers.Conv3D(num_classes, 1, name="logits")(x)
    outputs = layers.Activation("sigmoid", dtype="float32", name="probs")(logits)
    return keras.Model(inputs, outputs, name=name)


def slice_presence(probabilities):
    """Per-slice class presence of a 3D output: probabilities [..., D, H, W, K] -> [..., D, K], the largest
    probability on the slice (a class is on a slice when some pixel of it passes the threshold)."""
    return ops.max(probabilities, axis=(-3, -2))
