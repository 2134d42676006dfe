"""What a run shows in TensorBoard: scalars per epoch, validation slices with their contours, and an
optional profile of some steps (TensorBoard's Profile tab)."""

import keras
import numpy as np
import tensorflow as tf

from tfseg.config import Config
from tfseg.data.context import centre_index
from tfseg.draw import draw_contours
from tfseg.errors import ConfigError
from tfseg.model.unet import split_outputs

IMAGES = 4  # validation slices shown


def parse_profile(spec: str | None) -> tuple[int, int] | None:
    """'10,20' -> global steps 10..20 (1-based, inclusive); '5' -> just step 5."""
    if not spec:
        return None
    first, _, last = str(spec).partition(",")
    try:
        steps = int(first), int(last or first)
    except ValueError:
        steps = (0, 0)
    if not 1 <= steps[0] <= steps[1]:
        raise ConfigError(f"train.profile_batches: expected START,STOP steps with 1 <= START <= STOP, got {spec!r}")
    return steps


class Profiler:
    """Captures a profile of the global steps in `spec` (train.profile_batches) into `logdir`."""

    def __init__(self, spec: str | None, logdir):
        self.steps, self.logdir, self.active = parse_profile(spec), str(logdir), False

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0]:
            tf.profiler.experimental.start(self.logdir)
            self.active = True

    def after(self, step: int) -> None:
        if self.active and step == self.steps[1]:
            self.stop()

    def stop(self) -> None:
        if self.active:
            tf.profiler.experimental.stop()
            self.active = False


def validation_images(dataset, count: int = IMAGES) -> tuple[np.ndarray | None, np.ndarray | None]:
    """`count` validation slices with organs, spread over the first ones found: scans and masks."""
    scans, masks = [], []
    for x, y in dataset:
        keep = np.asarray(tf.reduce_any(y > 0, axis=list(range(1, len(y.shape)))))
        scans += list(x.numpy()[keep])
        masks += list(y.numpy()[keep])
        if len(scans) >= 16 * count:
            break
    if not scans:
        return None, None
    pick = np.linspace(0, len(scans) - 1, min(count, len(scans))).round().astype(int)
    return np.stack([scans[i] for i in pick]), np.stack([masks[i] for i in pick])




def log_epoch(writers, row: dict, epoch: int, model, image_data, config: Config, epochs: int) -> None:
    """Scalars of one history row; every train.image_log_every epochs (and the last) the validation
    slices with true (solid) and predicted (dashed) contours."""
    with writers["train"].as_default(step=epoch):
        tf.summary.scalar("loss", row["loss"])
        tf.summary.scalar("learning_rate", row["lr"])
    with writers["validation"].as_default(step=epoch):
        for key, value in row.items():
            if key.startswith("val_"):
                tf.summary.scalar(key.removeprefix("val_"), value)
        every = config.train.image_log_every
        if every and image_data[0] is not None and (epoch % every == 0 or epoch == epochs):
            scans, masks = image_data
            pred = keras.ops.convert_to_numpy(split_outputs(model(scans, training=False))[0]) > config.train.threshold
            centre = centre_index(config.data.offsets)
            if scans.ndim == 5:  # 3D patches: their middle slice
                middle = scans.shape[1] // 2
                scans, masks, pred, centre = scans[:, middle], masks[:, middle], pred[:, middle], 0
            images = [draw_contours(s[..., centre], m, p) for s, m, p in zip(scans, masks, pred, strict=True)]
            tf.summary.image("predictions", np.stack(images), max_outputs=len(images),
                             description="scan with true (solid) and predicted (dashed) contours")
        writers["validation"].flush()
    writers["train"].flush()
