"""AdamW with per-variable learning-rate multipliers (a lower rate for a pretrained trunk).

Keras 3 has no per-variable learning rate. Two optimizers would need a custom train
step, and BackupAndRestore, checkpoints and ReduceLROnPlateau know only
`model.optimizer`. One optimizer that scales the rate per variable keeps all of
them working: ReduceLROnPlateau lowers the base rate, and with it every scaled rate.

Decoupled weight decay is scaled with the rate (decay = lr · multiplier · wd), as
it would be under a separate optimizer with the lower rate.
"""
from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="embedlab")
class ScaledAdamW(keras.optimizers.AdamW):
    """AdamW where variables whose path starts with a key of `lr_multipliers` train at
    learning_rate × that multiplier (the longest matching prefix wins)."""

    def __init__(self, lr_multipliers: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.lr_multipliers = {str(k): float(v) for k, v in (lr_multipliers or {}).items()}
        for prefix, multiplier in self.lr_multipliers.items():
            if not multiplier >= 0:
                raise ValueError(f"lr_multipliers[{prefix!r}] must be >= 0, got {multiplier}")
        self._multipliers: list[float] = []

    def multiplier_for(self, path: str) -> float:
        matches = [prefix for prefix in self.lr_multipliers if path.startswith(prefix)]
        return self.lr_multipliers[max(matches, key=len)] if matches else 1.0

    def build(self, var_list):
        if self.built:
            return
        # By variable index: inside a distributed update the variable handed to
        # update_step is the raw tf.Variable, which has no Keras path.
        self._multipliers = [self.multiplier_for(v.path) for v in var_list]
        super().build(var_list)

    def _multiplier(self, variable) -> float:
        return self._multipliers[self._get_variable_index(variable)]

    def _use_weight_decay(self, variable):
        # Scaled variables decay inside update_step, at their own rate.
        return super()._use_weight_decay(variable) and self._multiplier(variable) == 1.0

    def update_step(self, gradient, variable, learning_rate):
        multiplier = self._multiplier(variable)
        if multiplier != 1.0:
            learning_rate = ops.cast(learning_rate, variable.dtype) * multiplier
            if self.weight_decay and super()._use_weight_decay(variable):
                decay = ops.cast(self.weight_decay, variable.dtype) * learning_rate
                self.assign_sub(variable, variable * decay)
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "lr_multipliers": dict(self.lr_multipliers)}
