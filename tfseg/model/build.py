"""The model and loss a config asks for."""

import keras
import tensorflow as tf

from tfseg import CLASSES
from tfseg.config import Config
from tfseg.model.losses import get_loss
from tfseg.model.unet import build_unet
from tfseg.model.unet3d import build_unet3d

# A replica's share of the batch at or below which auto synchronises batch norm across replicas:
# statistics of a few slices are noisy, and unsynchronised they change with the replica count.
SYNC_BELOW = 8


def resolve_norm(norm: str, global_batch: int, replicas: int) -> str:
    """`auto` -> sync_batch when there is more than one replica and each holds at most SYNC_BELOW
    slices, else batch; other choices are kept."""
    if norm != "auto":
        return norm
    return "sync_batch" if replicas > 1 and global_batch // replicas <= SYNC_BELOW else "batch"


def build_model(config: Config) -> keras.Model:
    """The UNet of config.model for config.data's input (under the current dtype policy): model.kind 2.5d
    takes [B, H, W, len(offsets)] slices, 3d takes [B, D, H, W, 1] patches or volumes of any fitting size."""
    m = config.model
    norm = resolve_norm(m.norm, config.data.batch_size, tf.distribute.get_strategy().num_replicas_in_sync)
    if m.kind == "3d":
        return build_unet3d((None, None, None, 1), len(CLASSES), depth=m.depth, z_pools=m.z_pools,
                            base_filters=m.base_filters, block=m.block, norm=norm, dropout=m.dropout,
                            upsample=m.upsample)
    return build_unet((*config.data.image_size, len(config.data.offsets)), len(CLASSES), depth=m.depth,
                      base_filters=m.base_filters, block=m.block, norm=norm, dropout=m.dropout,
                      upsample=m.upsample, encoder=m.encoder, encoder_weights=m.encoder_weights,
                      presence_head=m.presence_head, coord_channels=m.coord_channels)


def build_loss(config: Config) -> keras.losses.Loss:
    c = config.loss
    options = {"bce_dice": {"bce_weight": c.bce_weight, "dice_weight": c.dice_weight, "batch_dice": c.batch_dice},
               "tversky": {"alpha": c.tversky_alpha, "beta": c.tversky_beta},
               "focal": {"gamma": c.focal_gamma, "alpha": c.focal_alpha},
               "focal_dice": {"bce_weight": c.bce_weight, "dice_weight": c.dice_weight, "batch_dice": c.batch_dice,
                              "gamma": c.focal_gamma, "alpha": c.focal_alpha}}[c.name]
    return get_loss(c.name, **options, from_logits=True)  # training steps feed the logits (Steps)
