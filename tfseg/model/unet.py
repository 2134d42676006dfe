"""The segmentation network: a Keras 3 UNet with an optional keras.applications encoder."""

import inspect
import math
import warnings
from pathlib import Path

import keras
import numpy as np
from keras import layers

from tfseg.errors import ConfigError

BLOCKS = ("plain", "residual")
NORMS = ("batch", "sync_batch", "group", "none")  # sync_batch: batch statistics over all replicas
UPSAMPLES = ("transpose", "resize")
# Where a backbone's feature lives: a layer name (its output), "NAME.input" (the input of layer NAME),
# OUTPUT (the backbone's own output) or STRIDE2 (the backbone has no stride-2 feature: a conv tfseg adds).
OUTPUT, STRIDE2 = "output", "stride2"
# For each backbone: the keras.applications constructor and its features at strides 2, 4, 8, 16 and 32
# (the last stage's output), found by building the models at 64 px and listing their layers' output shapes;
# each is the last block output at its stride. ConvNeXt's stem is a 4x4 stride-4 conv, so its stride-2
# feature is a 3x3 stride-2 conv on the encoder's input; its stage outputs are unnamed additions, read where
# the next downsampling block starts, and it ends in an unnamed layer norm.
ENCODERS = {
    "efficientnetv2b0": (
        "EfficientNetV2B0",
        ("block1a_project_activation", "block2b_add", "block3b_add", "block5e_add", "top_activation"),
    ),
    "efficientnetv2s": (
        "EfficientNetV2S",
        ("block1b_add", "block2d_add", "block3d_add", "block5i_add", "top_activation"),
    ),
    "efficientnetv2m": (
        "EfficientNetV2M",
        ("block1c_add", "block2e_add", "block3e_add", "block5n_add", "top_activation"),
    ),
    "efficientnetv2l": (
        "EfficientNetV2L",
        ("block1d_add", "block2g_add", "block3g_add", "block5s_add", "top_activation"),
    ),
    "efficientnetb4": (
        "EfficientNetB4",
        ("block1b_add", "block2d_add", "block3d_add", "block5f_add", "top_activation"),
    ),
    "efficientnetb5": (
        "EfficientNetB5",
        ("block1c_add", "block2e_add", "block3e_add", "block5g_add", "top_activation"),
    ),
    "efficientnetb6": (
        "EfficientNetB6",
        ("block1c_add", "block2f_add", "block3f_add", "block5h_add", "top_activation"),
    ),
    "efficientnetb7": (
        "EfficientNetB7",
        ("block1d_add", "block2g_add", "block3g_add", "block5j_add", "top_activation"),
    ),
    "resnet50": (
        "ResNet50",
        ("conv1_relu", "conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
    ),
    "convnext_tiny": (
        "ConvNeXtTiny",
        (STRIDE2, "convnext_tiny_downsampling_block_0.input", "convnext_tiny_downsampling_block_1.input",
         "convnext_tiny_downsampling_block_2.input", OUTPUT),
    ),
    "convnext_small": (
        "ConvNeXtSmall",
        (STRIDE2, "convnext_small_downsampling_block_0.input", "convnext_small_downsampling_block_1.input",
         "convnext_small_downsampling_block_2.input", OUTPUT),
    ),
    "convnext_base": (
        "ConvNeXtBase",
        (STRIDE2, "convnext_base_downsampling_block_0.input", "convnext_base_downsampling_block_1.input",
         "convnext_base_downsampling_block_2.input", OUTPUT),
    ),
}
# null (random), imagenet (Keras downloads them) or the path of a .h5 / .weights.h5 file of the backbone's
# weights (keras.applications.X(include_top=False).save_weights, or Keras' own *_notop.h5).
ENCODER_WEIGHTS = (None, "imagenet")
STRIDE2_FILTERS = 64  # ConvNeXt's added stride-2 conv
GROUPS = 8  # GroupNormalization groups (fewer when a layer has fewer channels)
# Batch-norm moving averages keep 10% of each new batch (PyTorch's default; Keras' 0.99 keeps 1%), so
# the statistics used at validation keep up with the weights in short runs.
BN_MOMENTUM = 0.9


def build_unet(
    input_shape: tuple[int | None, int | None, int] = (256, 256, 3),
    num_classes: int = 3,
    *,
    depth: int | None = None,
    base_filters: int = 32,
    block: str = "plain",
    norm: str = "batch",
    dropout: float = 0.0,
    upsample: str = "transpose",
    encoder: str | None = None,
    encoder_weights: str | None = None,
    presence_head: bool = False,
    coord_channels: bool = False,
    name: str = "unet",
) -> keras.Model:
    """Build a UNet mapping [B, H, W, C] scans in [0, 1] to [B, H, W, num_classes] probabilities.

    C is the number of stacked context slices (2.5D input). The output has one sigmoid channel per
    class (organs may overlap), computed in float32 under any mixed-precision policy.

    depth is the number of 2x downsamplings; H and W must be divisible by 2**depth (or be None for
    a fully convolutional model). It defaults to 4 for the built-in encoder and to 5, the whole
    backbone with its bottleneck at stride 32, for a keras.applications `encoder`; a smaller depth
    cuts the backbone at stride 2**depth. Decoder level i (stride 2**i) has base_filters * 2**i
    filters. dropout is SpatialDropout2D inside every conv block tfseg adds (not in the backbone).

    presence_head adds a second output: per class, the probability that the slice shows the organ at
    all (global average pooling of the bottleneck, a dense layer, sigmoid in float32); the model then
    returns {"probabilities": [B, H, W, K], "presence": [B, K]} (see split_outputs).

    coord_channels appends each pixel's row and column (CoordChannels) to the scans (built-in encoder only).
    """
    depth = _check_options(input_shape, num_classes, depth, base_filters, block, norm, dropout,
                           upsample, encoder, encoder_weights)
    inputs = keras.Input(shape=input_shape, name="scans")
    conv_block = block_function(block)

    def convs(x, filters, prefix):
        return conv_block(x, filters, norm=norm, dropout=dropout, prefix=prefix)

    if coord_channels and encoder is not None:
        raise ConfigError(f"model: coord_channels works with the built-in encoder only, not {encoder!r}")
    if encoder is None:
        skips, x = [], CoordChannels(name="coords")(inputs) if coord_channels else inputs
        for level in range(depth):
            x = convs(x, base_filters * 2**level, f"enc{level}")
            skips.append(x)
            x = layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
        x = convs(x, base_filters * 2**depth, "bottleneck")
    else:
        # C context slices go straight in: the backbone is built for C channels (_backbone inflates RGB weights).
        features = _backbone(input_shape[:2], input_shape[2], encoder, encoder_weights, depth)(inputs)
        # The full-resolution skip is the input itself: backbones start with a strided conv.
        skips, x = [inputs, *features[:-1]], features[-1]
    bottleneck = x

    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        if upsample == "transpose":
            x = layers.Conv2DTranspose(filters, 2, strides=2, name=f"dec{level}_up")(x)
        else:
            x = layers.UpSampling2D(2, interpolation="bilinear", name=f"dec{level}_up")(x)
        x = layers.Concatenate(name=f"dec{level}_concat")([x, skips[level]])
        x = convs(x, filters, f"dec{level}")

    logits = layers.Conv2D(num_classes, 1, name="logits")(x)
    # float32 so probabilities (and the loss computed from them) keep full precision under a
    # mixed_float16 / mixed_bfloat16 policy.
    outputs = layers.Activation("sigmoid", dtype="float32", name="probs")(logits)
    if not presence_head:
        return keras.Model(inputs, outputs, name=name)
    pooled = layers.GlobalAveragePooling2D(name="presence_pool")(bottleneck)
    presence = layers.Activation("sigmoid", dtype="float32", name="presence")(
        layers.Dense(num_classes, name="presence_logits")(pooled))
    return keras.Model(inputs, {"probabilities": outputs, "presence": presence}, name=name)


@keras.saving.register_keras_serializable(package="tfseg")
class CoordChannels(layers.Layer):
    """Appends two channels, the pixel's row and column in [-1, 1] (CoordConv, Liu et al. 2018): organs
    lie at fixed places in the body, which plain convolutions only learn from the zero padding."""

    def call(self, x):
        shape = keras.ops.shape(x)
        rows = keras.ops.linspace(-1.0, 1.0, shape[1])
        cols = keras.ops.linspace(-1.0, 1.0, shape[2])
        grid = keras.ops.stack(keras.ops.meshgrid(rows, cols, indexing="ij"), axis=-1)
        grid = keras.ops.broadcast_to(grid[None], (shape[0], shape[1], shape[2], 2))
        return keras.ops.concatenate([x, keras.ops.cast(grid, x.dtype)], axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] + 2)


def split_outputs(outputs):
    """(probabilities, presence or None) of a model call, with or without a presence head."""
    if isinstance(outputs, dict):
        return outputs["probabilities"], outputs["presence"]
    return outputs, None


def _check_options(input_shape, num_classes, depth, base_filters, block, norm, dropout, upsample,
                   encoder, encoder_weights) -> int:
    """Validate build_unet's arguments; return the depth to use."""
    check_layers(num_classes, base_filters, block, norm, dropout, upsample)
    if encoder not in (None, *ENCODERS):
        raise ConfigError(f"model: encoder must be one of {(None, *ENCODERS)}, got {encoder!r}")
    is_file = isinstance(encoder_weights, str) and encoder_weights.endswith(".h5")
    if not (encoder_weights in ENCODER_WEIGHTS or is_file):
        raise ConfigError(f"model: encoder_weights must be null, 'imagenet' or the path of a .h5 / .weights.h5 "
                          f"file, got {encoder_weights!r}")
    if encoder is None and encoder_weights is not None:
        raise ConfigError(f"model: encoder_weights={encoder_weights!r} needs an encoder ({tuple(ENCODERS)})")
    if is_file and not Path(encoder_weights).expanduser().is_file():
        raise ConfigError(f"model: encoder_weights file {encoder_weights} for encoder {encoder!r} does not exist")
    max_depth = 5 if encoder else None
    depth = (5 if encoder else 4) if depth is None else depth
    if not (isinstance(depth, int) and depth >= 1 and (max_depth is None or depth <= max_depth)):
        limit = f"1..{max_depth} with encoder {encoder!r}" if max_depth else ">= 1"
        raise ConfigError(f"model: depth must be an integer {limit}, got {depth!r}")
    if len(input_shape) != 3 or not (isinstance(input_shape[2], int) and input_shape[2] >= 1):
        raise ConfigError(f"model: input_shape must be (H, W, C) with C >= 1 slices, got {input_shape!r}")
    factor = 2**depth
    for size in input_shape[:2]:
        if size is not None and not (isinstance(size, int) and size > 0 and size % factor == 0):
            raise ConfigError(f"model: input height and width must be positive multiples of 2**depth = "
                              f"{factor} (depth {depth}), got input_shape {tuple(input_shape)!r}; "
                              f"resize or pad the scans, e.g. to {_round_up(input_shape[:2], factor)}")
    return depth


def check_layers(num_classes, base_filters, block, norm, dropout, upsample) -> None:
    """The options every UNet shares (2.5D and 3D): ConfigError naming the bad one."""
    for option, value, allowed in (("block", block, BLOCKS), ("norm", norm, NORMS), ("upsample", upsample, UPSAMPLES)):
        if value not in allowed:
            raise ConfigError(f"model: {option} must be one of {allowed}, got {value!r}")
    for option, value in (("num_classes", num_classes), ("base_filters", base_filters)):
        if not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"model: {option} must be a positive integer, got {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model: dropout must be in [0, 1), got {dropout!r}")


def _round_up(sizes, factor: int) -> tuple:
    return tuple(s if s is None else max(factor, math.ceil(s / factor) * factor) for s in sizes)


def _backbone(size: tuple, channels: int, encoder: str, weights: str | None, depth: int) -> keras.Model:
    """A keras.applications model for `channels` input slices as a sub-model 'encoder' with the features
    at strides 2..2**depth.

    Pretrained weights (imagenet or a file) are for 3 RGB channels; with another number of slices the
    backbone is built for them and its RGB weights inflated into it (_inflate): a scan that is the same
    on every slice gives exactly the RGB model's features on that grey image (EfficientNet B: up to a
    per-filter constant at the stem, see _inflate). Freeze it for warm-up with
    `model.get_layer("encoder").trainable = False` (ConvNeXt's stride-2 conv, which no weights file holds,
    then stays at its random start too).
    """
    constructor_name, feature_specs = ENCODERS[encoder]
    pretrained = weights is not None
    rgb = _application(encoder, size, 3, weights) if pretrained else None
    backbone = rgb if pretrained and channels == 3 else _application(encoder, size, channels, None)
    if weights not in ENCODER_WEIGHTS:
        _load_backbone_weights(rgb, weights, encoder, constructor_name)
    if backbone is not rgb and rgb is not None:
        _inflate(rgb, backbone)

    scans = backbone.inputs[0]  # EfficientNet B's inputs is a list when built on an input_tensor

    def feature(spec: str):
        if spec == OUTPUT:
            return backbone.output
        if spec == STRIDE2:
            x = layers.Conv2D(STRIDE2_FILTERS, 3, strides=2, padding="same", name="stride2_conv")(scans)
            x = layers.LayerNormalization(epsilon=1e-6, name="stride2_norm")(x)
            return layers.Activation("gelu", name="stride2_gelu")(x)
        name, _, port = spec.partition(".")
        return getattr(backbone.get_layer(name), port or "output")

    return keras.Model(scans, [feature(spec) for spec in feature_specs[:depth]], name="encoder")


def _application(encoder: str, size: tuple, channels: int, weights: str | None) -> keras.Model:
    """The encoder's keras.applications model (include_top=False) for [0, 1] scans of `channels`
    channels; weights "imagenet" downloads them (3 channels only), anything else builds it random."""
    constructor_name = ENCODERS[encoder][0]
    constructor = getattr(keras.applications, constructor_name)
    options = {"include_top": False, "weights": "imagenet" if weights == "imagenet" else None,
               "input_shape": (*size, channels)}
    # Our inputs are already [0, 1] scans, not [0, 255] RGB, so skip EfficientNetV2's and ConvNeXt's
    # built-in rescaling and normalisation. ResNet50 has none; its conv1 is followed by batch norm.
    if "include_preprocessing" in inspect.signature(constructor).parameters:
        options["include_preprocessing"] = False
    if constructor_name.startswith("EfficientNetB"):
        # EfficientNet B0-B7 always divide by 255, then normalise with the ImageNet statistics their
        # weights carry: scaling [0, 1] scans to [0, 255] first gives the range those weights expect.
        # Keras adds one more 1/sqrt(std) rescaling (tensorflow#49930) only when it downloads them itself;
        # loaded from a file they lack it: a near-uniform input scale, which stem_bn after the bias-free
        # stem_conv normalises away in training.
        options["input_tensor"] = layers.Rescaling(255.0, name="to_0_255")(keras.Input((*size, channels)))
    try:
        with warnings.catch_warnings():  # "expects 1 or 3 input channels": tfseg inflates the RGB weights
            warnings.filterwarnings("ignore", message=".*input channels", category=UserWarning)
            return constructor(**options)
    except Exception as err:  # keras raises a bare Exception when the download fails
        if options["weights"] is None:
            raise
        raise RuntimeError(
            f"model: the {weights} weights for encoder {encoder!r} could not be downloaded or loaded "
            f"({err}). This machine may have no internet: set encoder_weights: null, or place the "
            "Keras weights file in ~/.keras/models (or $KERAS_HOME/models)") from err


def _stem_input(backbone: keras.Model):
    """What the backbone's first convolution sees: its input after any preprocessing layers (EfficientNet
    B's rescalings and normalisation, zero padding), as a function of the input."""
    for layer in backbone.layers[1:]:
        if layer.weights and any(isinstance(sub, layers.Conv2D) for sub in (layer, *getattr(layer, "layers", ()))):
            return keras.Model(backbone.inputs[0], layer.input)
    raise ValueError(f"{backbone.name}: no convolution found")


def _channel_affine(backbone: keras.Model) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) per input channel of the elementwise preprocessing in front of the first conv,
    read at the centre pixel of a 0 and a 1 input (identity (1, 0) for a backbone without one)."""
    stem = _stem_input(backbone)
    shape = (1, *backbone.inputs[0].shape[1:])
    zero, one = (keras.ops.convert_to_numpy(stem(np.full(shape, v, np.float32)))[0] for v in (0.0, 1.0))
    h, w = zero.shape[0] // 2, zero.shape[1] // 2
    return one[h, w] - zero[h, w], zero[h, w]


def _inflate(rgb: keras.Model, backbone: keras.Model) -> None:
    """Copy an RGB backbone's weights into the same backbone built for K input channels.

    Every weight is the same but the first convolution's kernel [kh, kw, 3, F] and, in EfficientNet B,
    the input normalisation's per-channel ImageNet mean and variance [3]. The statistics become their
    mean over RGB on each of the K channels; the kernel spreads the RGB filters over the K channels,
    kernel_K[..., k, :] = sum_c kernel_rgb[..., c, :] * scale_c / (K * scale'), where scale_c is channel
    c's preprocessing scale in the RGB model and scale' the K model's (both 1 without preprocessing:
    the mean over RGB times 3 / K). A scan equal on all K channels then gives the RGB model's output on
    that grey image exactly; with EfficientNet B's per-channel means the stem conv's output differs by a
    constant per filter (sum_c kernel_c * (offset_c - scale_c * offset' / scale')), which training absorbs.
    """
    kernels = []
    for old, new in zip(rgb.weights, backbone.weights, strict=True):
        if tuple(old.shape) == tuple(new.shape):
            new.assign(old)
        elif len(old.shape) == 1:  # the normalisation's per-channel mean or variance
            new.assign(np.full(new.shape, np.mean(keras.ops.convert_to_numpy(old)), np.float32))
        elif len(old.shape) == 4 and old.shape[:2] == new.shape[:2] and old.shape[3] == new.shape[3]:
            kernels.append((old, new))
        else:
            raise ValueError(f"cannot inflate {old.path} {tuple(old.shape)} into {tuple(new.shape)}")
    if len(kernels) != 1:
        raise ValueError(f"{backbone.name}: expected one input convolution to inflate, found {len(kernels)}")
    (old, new), channels = kernels[0], backbone.inputs[0].shape[-1]
    scale_rgb, scale = _channel_affine(rgb)[0], _channel_affine(backbone)[0]
    kernel = keras.ops.convert_to_numpy(old)
    spread = np.tensordot(kernel, scale_rgb / scale[0], axes=([2], [0])) / channels  # [kh, kw, F]
    new.assign(np.repeat(spread[:, :, None, :], channels, axis=2).astype(np.float32))


def _load_backbone_weights(backbone: keras.Model, path: str, encoder: str, constructor_name: str) -> None:
    """Load a weights file into the backbone; a file that does not fit is a ConfigError saying why."""
    with warnings.catch_warnings(record=True) as caught:  # a file that does not fit warns per layer
        warnings.simplefilter("always")
        try:
            backbone.load_weights(Path(path).expanduser())
        except OSError as err:
            reason = f"not an HDF5 weights file ({err})"
        except Exception as err:  # ValueError: other layers or shapes (Keras lists them all: keep the start)
            reason = " ".join(str(err).split(" List of objects")[0].split())
            reason = f"its weights do not match ({reason if len(reason) <= 300 else reason[:300] + ' ...'})"
        else:
            reason = None
    if reason:
        raise ConfigError(f"model: encoder_weights file {path} does not load into encoder {encoder!r} "
                          f"(keras.applications.{constructor_name}, include_top=False): {reason}")
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _norm(x, norm: str, name: str):
    if norm in ("batch", "sync_batch"):
        return layers.BatchNormalization(momentum=BN_MOMENTUM, synchronized=norm == "sync_batch", name=name)(x)
    if norm == "group":
        return layers.GroupNormalization(groups=math.gcd(GROUPS, x.shape[-1]), name=name)(x)
    return x


def _is_3d(x) -> bool:
    """Whether x is a [B, D, H, W, C] tensor: the blocks below build 3D layers for it (unet3d)."""
    return len(x.shape) == 5


def _conv(x, filters: int, kernel: int, name: str, use_bias: bool):
    conv = layers.Conv3D if _is_3d(x) else layers.Conv2D
    return conv(filters, kernel, padding="same", use_bias=use_bias, name=name)(x)


def _spatial_dropout(x, rate: float, name: str):
    return (layers.SpatialDropout3D if _is_3d(x) else layers.SpatialDropout2D)(rate, name=name)(x)


def _conv_norm(x, filters: int, norm: str, name: str):
    return _norm(_conv(x, filters, 3, f"{name}_conv", norm == "none"), norm, f"{name}_norm")


def _plain_block(x, filters: int, *, norm: str, dropout: float, prefix: str):
    """(3x3 conv, norm, ReLU) twice, with optional spatial dropout between the two (3x3x3 on 3D input)."""
    x = layers.ReLU(name=f"{prefix}_relu1")(_conv_norm(x, filters, norm, f"{prefix}_1"))
    if dropout:
        x = _spatial_dropout(x, dropout, f"{prefix}_dropout")
    return layers.ReLU(name=f"{prefix}_relu2")(_conv_norm(x, filters, norm, f"{prefix}_2"))


def _residual_block(x, filters: int, *, norm: str, dropout: float, prefix: str):
    """Two 3x3 conv + norm with an identity (or 1x1 conv when channels change) shortcut (3x3x3 on 3D input)."""
    shortcut = x
    if x.shape[-1] != filters:
        shortcut = _norm(_conv(x, filters, 1, f"{prefix}_proj_conv", norm == "none"), norm, f"{prefix}_proj_norm")
    x = layers.ReLU(name=f"{prefix}_relu1")(_conv_norm(x, filters, norm, f"{prefix}_1"))
    if dropout:
        x = _spatial_dropout(x, dropout, f"{prefix}_dropout")
    x = _conv_norm(x, filters, norm, f"{prefix}_2")
    x = layers.Add(name=f"{prefix}_add")([x, shortcut])
    return layers.ReLU(name=f"{prefix}_relu2")(x)


def block_function(block: str):
    """The conv block called `block` (plain | residual); it builds 2D or 3D layers for its input's rank."""
    return _residual_block if block == "residual" else _plain_block


def logits_model(model: keras.Model) -> keras.Model:
    """The same layers as `model` (shared weights) ending before the sigmoids: what the losses take in
    training, so BCE is computed from logits."""
    logits = model.get_layer("logits").output
    if not isinstance(model.output, dict):
        return keras.Model(model.input, logits, name=f"{model.name}_logits")
    outputs = {"probabilities": logits, "presence": model.get_layer("presence_logits").output}
    return keras.Model(model.input, outputs, name=f"{model.name}_logits")
