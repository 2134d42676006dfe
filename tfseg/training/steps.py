"""The compiled train and validation steps that every strategy runs.

Keras' model.fit breaks under MultiWorkerMirroredStrategy with 2+ workers (keras-team/keras#20585),
so training is one tf.distribute loop for all strategies: a tf.function step run with strategy.run,
per-example losses averaged over the GLOBAL batch (tf.nn.compute_average_loss), gradients summed over
replicas once, clipped by their global norm, then applied. The losses take the model's logits (a view
of the same layers), so BCE is exact under any precision.
"""

import keras
import numpy as np
import tensorflow as tf

from tfseg import CLASSES
from tfseg.config import Config
from tfseg.data.augment import finish_batch
from tfseg.model.losses import BceDiceLoss, per_example_loss, presence_loss, presence_targets, probabilities
from tfseg.model.metrics import DiceMetric, IoUMetric
from tfseg.model.unet import logits_model, split_outputs
from tfseg.training.optimizer import loss_scale

SUM = tf.distribute.ReduceOp.SUM


class Steps:
    """The compiled train and validation steps of one model under one strategy."""

    def __init__(self, strategy: tf.distribute.Strategy, model: keras.Model, optimizer, loss,
                 global_batch: int, config: Config):
        self.strategy, self.model, self.optimizer, self.loss = strategy, model, optimizer, loss
        self.global_batch, self.train_config = global_batch, config.train
        self.presence_weight = config.loss.presence_weight
        self.from_logits = getattr(loss, "from_logits", False)
        self.network = logits_model(model) if self.from_logits else model
        if strategy.num_replicas_in_sync > 1:
            check_optimizer_sums_replicas(strategy)
        self.augment = config.augment if config.augment.device == "accelerator" else None
        # Batch Dice over the global batch: each replica all-reduces the batch's Dice sums inside its step.
        self.global_dice = (isinstance(loss, BceDiceLoss) and loss.batch_dice
                            and strategy.num_replicas_in_sync > 1)
        # XLA compiles the forward and backward pass of one replica; the cross-replica sum and the
        # update stay outside it, so jit_compile works under every strategy. The global batch Dice's
        # all-reduce sits inside the forward pass, where XLA cannot take it: that step runs without XLA.
        self.jit_compile = config.train.jit_compile and not self.global_dice
        self._gradients = tf.function(self._gradients_fn, jit_compile=True) if self.jit_compile \
            else self._gradients_fn
        self.train_step = tf.function(self._train_step)
        self.eval_step = tf.function(self._eval_step)

    def _gradients_fn(self, x, y):
        with tf.GradientTape() as tape:
            pred, presence = split_outputs(self.network(x, training=True))
            per_example = self._per_example(y, pred)
            if presence is not None:
                per_example += self.presence_weight * presence_loss(y, presence, self.from_logits)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch)
            if self.model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(self.model.losses))
            scaled = self.optimizer.scale_loss(loss)  # the loss scale under mixed_float16, else loss
        return loss, tape.gradient(scaled, self.model.trainable_variables)

    def _per_example(self, y, pred):
        """The loss per example; with global batch Dice, from the all-reduced sums of the global batch.

        The sums' value is the global one; their gradient is the replica's own part times the replica
        count, since the loss averages over the global batch (a replica holds 1 / replicas of it) and
        the replicas' gradients are summed: the step's gradient is then exactly the single-device one.
        """
        if not self.global_dice:
            return per_example_loss(self.loss, y, pred)
        context = tf.distribute.get_replica_context()
        local = self.loss.batch_sums(y, pred)
        total = context.all_reduce(SUM, tf.stop_gradient(local))
        replicas = float(context.num_replicas_in_sync)
        sums = tf.stop_gradient(total - replicas * local) + replicas * local
        return self.loss.per_example_with_sums(y, pred, sums)

    def _replica_train(self, *batch):
        # augment.device accelerator: the batch arrives as the pipeline holds it and is augmented here,
        # on the replica's device, outside the XLA-compiled pass (its warp is compiled on its own).
        x, y = finish_batch(*batch, self.augment) if self.augment else batch
        loss, grads = self._gradients(x, y)
        context = tf.distribute.get_replica_context()
        # Sum once here so that clipping (and the loss-scale finite check) sees the full-batch
        # gradient on every replica; Keras' optimizer sums again, hence the division.
        grads = context.all_reduce(SUM, grads)
        if self.train_config.clip_norm > 0:  # clip the unscaled norm
            grads, _ = tf.clip_by_global_norm(grads, self.train_config.clip_norm * loss_scale(self.optimizer))
        replicas = context.num_replicas_in_sync
        self.optimizer.apply([g / replicas for g in grads], self.model.trainable_variables)
        return loss

    def _train_step(self, iterator):
        batch = next(iterator)
        return self.strategy.reduce(SUM, self.strategy.run(self._replica_train, args=batch), axis=None)

    def _replica_eval(self, x, y):
        """[loss sum, examples, intersection (K), predicted (K), true (K), and with a presence head its
        true positives, false positives, false negatives, true negatives (K each)]: one all-reduce."""
        pred, presence = split_outputs(self.network(x, training=False))
        y = tf.cast(y, tf.float32)
        per_example = self._per_example(y, pred)
        if presence is not None:
            per_example += self.presence_weight * presence_loss(y, presence, self.from_logits)
            presence, _ = probabilities(presence, self.from_logits)
        pred, _ = probabilities(pred, self.from_logits)
        true = tf.cast(y > 0.5, tf.float32)
        hard = tf.cast(pred > self.train_config.threshold, tf.float32)
        pixels = list(range(len(hard.shape) - 1))  # every axis but the classes', of slices or 3D patches
        sums = [tf.reduce_sum(v, axis=pixels) for v in (true * hard, hard, true)]
        if presence is not None:
            shown = presence_targets(y)
            said = tf.cast(presence >= self.train_config.presence_threshold, tf.float32)
            sums += [tf.reduce_sum(v, axis=0) for v in (said * shown, said * (1 - shown), (1 - said) * shown,
                                                        (1 - said) * (1 - shown))]
        return tf.concat([[tf.reduce_sum(per_example), tf.cast(tf.size(per_example), tf.float32)], *sums], 0)

    def _eval_step(self, x, y):
        return self.strategy.reduce(SUM, self.strategy.run(self._replica_eval, args=(x, y)), axis=None)

    def evaluate(self, dataset) -> dict:
        """Validation loss and Dice / IoU of all pixels of the (distributed) validation set at once."""
        totals = sum(self.eval_step(x, y).numpy().astype(np.float64) for x, y in dataset)
        loss, count, sums = totals[0], totals[1], totals[2:].reshape(-1, len(CLASSES))
        inter, pred, true = sums[:3]
        dice = np.asarray(DiceMetric.score(inter, pred, true))
        iou = np.asarray(IoUMetric.score(inter, pred, true))
        row = {"val_loss": loss / max(count, 1.0), "val_dice": float(dice.mean()), "val_iou": float(iou.mean()),
               **{f"val_dice_{c}": float(d) for c, d in zip(CLASSES, dice, strict=True)}}
        if len(sums) > 3:  # presence head: per class accuracy and F1 of "organ on this slice"
            tp, fp, fn, tn = sums[3:]
            f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.ones_like(tp), where=2 * tp + fp + fn > 0)
            accuracy = (tp + tn) / np.maximum(tp + fp + fn + tn, 1)
            row |= {"val_presence_f1": float(f1.mean()),
                    **{f"val_presence_f1_{c}": float(v) for c, v in zip(CLASSES, f1, strict=True)},
                    **{f"val_presence_accuracy_{c}": float(v) for c, v in zip(CLASSES, accuracy, strict=True)}}
        return row



def replica_sgd_update(strategy: tf.distribute.Strategy) -> float:
    """How far SGD(1.0) moves a weight (from 0) when replica i applies the gradient i + 1 in one step:
    -(1 + 2 + ... + N) if Keras' optimizer.apply sums the replicas' gradients."""
    with strategy.scope():
        weight = keras.Variable([0.0], name="replica_sum_probe")
        sgd = keras.optimizers.SGD(learning_rate=1.0)
        sgd.build([weight])

    def replica():
        grad = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group + 1, tf.float32)
        sgd.apply([tf.reshape(grad, [1])], [weight])

    tf.function(lambda: strategy.run(replica))()
    return float(weight.numpy()[0])


def check_optimizer_sums_replicas(strategy: tf.distribute.Strategy) -> None:
    """The replica step all-reduces the gradients itself (to clip the global batch's gradient) and then
    divides by the replica count, because Keras' optimizer.apply sums the replicas' gradients again
    (keras/src/backend/tensorflow/optimizer.py, _all_reduce_sum_gradients). That is Keras' internal
    behaviour, not its API: measure it on a throwaway variable and stop if it has changed."""
    replicas = strategy.num_replicas_in_sync
    moved, summed = replica_sgd_update(strategy), -replicas * (replicas + 1) / 2
    if abs(moved - summed) > 1e-6:
        raise RuntimeError(f"Keras' optimizer.apply moved a weight by {moved:g} where the sum of the {replicas} "
                           f"replicas' gradients is {-summed:g}: the installed Keras changed how it reduces "
                           "gradients, which tfseg's step relies on (tfseg.training.steps)")
