"""Unstructured magnitude pruning through `torch.nn.utils.prune`, on a schedule.

Pruning reparametrises each prunable weight as `weight = weight_orig * weight_mask`, so a
pruned entry stays exactly zero whatever the optimiser does to `weight_orig` (Adam, AdamW's
decoupled weight decay included), and the mask is a buffer saved with the state dict. The
tied embedding/decoder is one tensor (the embedding's), pruned once; the model reads it
through `LanguageModel.embedding_weight()` / `decoder_weight()`, so both uses see the mask.

Magnitudes are always read as `orig * mask` at the moment of pruning (`current_weight`),
never from the attribute `torch.nn.utils.prune`'s forward pre-hook leaves on the module: that
attribute is only refreshed when the module itself is called, which is one optimiser step
stale for the recurrent layers and never happens for the embedding (the model uses it
functionally).

Schedules (`prune.schedule`), progress measured in training steps:
  oneshot    the whole target at the first step of `start_epoch`, then fine-tuning
  gradual    Zhu & Gupta (2017): s(t) = s_f * (1 - (1 - (t - t0) / (t1 - t0))^3), updated every
             `update_every` steps from the start of `start_epoch` to the end of `end_epoch`
  iterative  `iterative_steps` equal steps, evenly spaced over the same span; each removes
             the same fraction of the weights still present: s_i = 1 - (1 - s_f)^(i / k)
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils import prune

from .config import PruneConfig
from .model import LanguageModel, current_weight


def cubic_sparsity(target: float, progress: float) -> float:
    """The gradual schedule's sparsity at `progress` in [0, 1] of its span."""
    progress = min(max(progress, 0.0), 1.0)
    return target * (1.0 - (1.0 - progress) ** 3)


def iterative_sparsity(target: float, done_steps: int, total_steps: int) -> float:
    return 1.0 - (1.0 - target) ** (done_steps / total_steps)


def _pruned_count(module: nn.Module, name: str) -> int:
    mask = getattr(module, name + "_mask", None)
    return 0 if mask is None else int((mask == 0).sum())


def _magnitudes(tensors: list[tuple[nn.Module, str]]) -> dict[tuple[nn.Module, str], Tensor]:
    """|orig * mask| of each tensor now (what the next forward pass multiplies with)."""
    return {(m, n): current_weight(m, n).detach().abs() for m, n in tensors}


def prune_to(tensors: list[tuple[nn.Module, str]], sparsity: float, scope: str) -> None:
    """Raise the sparsity of `tensors` to `sparsity` by L1 magnitude (never lowers it).

    scope 'layer': every tensor on its own reaches round(sparsity * numel) pruned entries;
    'global': the smallest magnitudes over all tensors together, round(sparsity * total).
    Entries already pruned stay pruned; the new ones are the smallest among the rest.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    scores = _magnitudes(tensors)
    if scope == "layer":
        for module, name in tensors:
            numel = scores[(module, name)].numel()
            extra = round(sparsity * numel) - _pruned_count(module, name)
            if extra > 0:
                prune.l1_unstructured(
                    module, name, amount=extra, importance_scores=scores[(module, name)]
                )
        return
    total = sum(s.numel() for s in scores.values())
    extra = round(sparsity * total) - sum(_pruned_count(m, n) for m, n in tensors)
    if extra > 0:
        prune.global_unstructured(
            tensors, pruning_method=prune.L1Unstructured, amount=extra, importance_scores=scores
        )


def tensor_name(model: nn.Module, module: nn.Module, name: str) -> str:
    """The dotted name of a prunable tensor, as in the state dict without `_orig`."""
    for path, candidate in model.named_modules():
        if candidate is module:
            return f"{path}.{name}" if path else name
    raise ValueError(f"{type(module).__name__} is not a submodule of the model")


def masks(model: nn.Module) -> dict[str, Tensor]:
    """Every pruning mask in the model, by state-dict name."""
    return {k: v for k, v in model.state_dict().items() if k.endswith("_mask")}


def restore_masks(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Re-create the pruning reparametrisation a saved state dict expects, before loading it."""
    modules = dict(model.named_modules())
    for key, mask in state_dict.items():
        if not key.endswith("_mask"):
            continue
        path, _, leaf = key.rpartition(".")
        module, name = modules[path], leaf[: -len("_mask")]
        if hasattr(module, name + "_mask"):
            getattr(module, name + "_mask").copy_(mask)
        else:
            device = current_weight(module, name).device
            prune.custom_from_mask(module, name, mask.to(device))


def final_epoch(cfg: PruneConfig) -> int:
    """The epoch after which the masks are final (0: no pruning); the best-validation model
    is chosen among epochs from this one on (train.py, and the analysis's run table)."""
    if cfg.schedule == "none" or not cfg.target_sparsity > 0:
        return 0
    return cfg.start_epoch if cfg.schedule == "oneshot" else cfg.end_epoch


class Pruner:
    """Applies the configured schedule as training goes; the train loop calls `step`."""

    def __init__(self, cfg: PruneConfig, model: LanguageModel, steps_per_epoch: int):
        self.cfg, self.model = cfg, model
        self.steps_per_epoch = max(steps_per_epoch, 1)
        self.tensors = model.prunable(cfg.include_embedding)
        self.active = cfg.schedule != "none" and cfg.target_sparsity > 0
        end_epoch = cfg.start_epoch if cfg.schedule == "oneshot" else cfg.end_epoch
        self.final_epoch = final_epoch(cfg)
        # in global steps; the target is reached at the span's end
        spe = self.steps_per_epoch
        self.span = ((cfg.start_epoch - 1) * spe, end_epoch * spe)
        self._applied = 0.0

    def sparsity_at(self, global_step: int) -> float:
        """The schedule's sparsity before training step `global_step` (0-based)."""
        cfg = self.cfg
        first, last = self.span
        if not self.active or global_step < first:
            return 0.0
        if cfg.schedule == "oneshot" or global_step >= last:
            return cfg.target_sparsity
        if cfg.schedule == "gradual":
            # held constant between updates, which happen every `update_every` steps
            updated = first + (global_step - first) // cfg.update_every * cfg.update_every
            return cubic_sparsity(cfg.target_sparsity, (updated - first) / (last - first))
        k = cfg.iterative_steps
        done = 1 + (global_step - first) * k // (last - first)  # step 1 happens at the start
        return iterative_sparsity(cfg.target_sparsity, min(done, k), k)

    def step(self, global_step: int) -> bool:
        """Prune up to the schedule's level for this step; True if a mask changed."""
        target = self.sparsity_at(global_step)
        if target <= self._applied:
            return False
        self._applied = target
        before = sum(_pruned_count(m, n) for m, n in self.tensors)
        prune_to(self.tensors, target, self.cfg.scope)
        return sum(_pruned_count(m, n) for m, n in self.tensors) != before

    def finish(self) -> None:
        """At the end of training the target is reached, whatever the step count was."""
        if self.active:
            prune_to(self.tensors, self.cfg.target_sparsity, self.cfg.scope)
            self._applied = self.cfg.target_sparsity
