"""Ray Tune's OptunaSearch with the search's constraint (its own module: importing it imports
Ray Tune and Optuna, which sweep specs and plans do not need)."""

from __future__ import annotations

import math
import warnings

from ray.tune.search.optuna import OptunaSearch

# Optuna's samplers fit their model (the GP's takes a second or two) inside the define-by-run
# space, so Tune's warning that the space function is slow, meant for training placed there
# by mistake, would be printed for every GP proposal.
warnings.filterwarnings("ignore", message="Define-by-run function passed in the `space` argument")


class ConstrainedOptunaSearch(OptunaSearch):
    """OptunaSearch that sets the trial's constraint value on the Optuna trial before telling
    Optuna its objectives (the samplers read it from there); `constraint_key` is the key of
    the trial's last result that holds it."""

    def __init__(self, *args, constraint_key: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.constraint_key = constraint_key

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        trial = self._ot_trials.get(trial_id)
        if trial is not None and result and self.constraint_key in result:
            value = float(result[self.constraint_key])
            trial.set_constraint("constraint", value if math.isfinite(value) else 1e300)
        super().on_trial_complete(trial_id, result, error)
