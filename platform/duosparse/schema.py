"""Every MLflow name duosparse writes or reads (docs/design.md section 5). Nowhere else.

params are the flattened RunConfig (`RunConfig.flat()`: `model.arch`, `prune.target_sparsity`,
...); metrics use step = epoch, and the final figures (test split, best-validation weights)
are logged once more at the end with step = the last epoch.
"""

from __future__ import annotations

# --- tags -----------------------------------------------------------------------------
TAG_RUN_KEY = "duosparse.run_key"
TAG_SWEEP = "duosparse.sweep"
TAG_SPEC_HASH = "duosparse.spec_hash"
TAG_CODE_VERSION = "duosparse.code_version"
TAG_GIT_SHA = "duosparse.git_sha"
TAG_FAILURE = "duosparse.failure"
TAG_KIND = "duosparse.kind"  # "train" (one run), "trial" (a sweep's child run), "sweep" (parent)
TAG_EARLY_STOPPED = "duosparse.early_stopped"
TAG_DRIVER = "duosparse.driver"  # host:pid of the process that launched a sweep or runs a `train`
TAG_STAGE = "duosparse.stage"  # the sweep stage of a trial (specs with stages only)
TAG_PARENT_RUN_ID = "mlflow.parentRunId"  # MLflow's own tag for nesting runs in the UI
TAG_RUN_NAME = "mlflow.runName"
TAG_GIT_COMMIT = "mlflow.source.git.commit"  # MLflow's own: the UI shows it on each run
TAG_NOTE = "mlflow.note.content"  # MLflow's own: the description of a run or an experiment
# MLflow 3's UI opens an experiment in the view its kind names (its JS reads this tag;
# without it the UI may infer the GenAI view); duosparse's are model training
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"
# the columns worth showing first in the runs table (the launch note names them)
UI_COLUMNS = (
    "val/ppl",
    "test/ppl",
    "sparsity/activity",
    "sparsity/weight",
    "ops/effective_macs_per_token",
    "ops/compute_reduction",
)

# --- metrics: language modelling ------------------------------------------------------
TRAIN_LOSS = "train/loss"
VAL_LOSS = "val/loss"
VAL_PPL = "val/ppl"
TEST_LOSS = "test/loss"
TEST_PPL = "test/ppl"

# --- metrics: sparsity ----------------------------------------------------------------
SPARSITY_WEIGHT = "sparsity/weight"
SPARSITY_ACTIVITY = "sparsity/activity"


# the fraction of units that emit on no token of the split: sparsity from a dead part of a
# layer (a narrower model in disguise) rather than from units that each emit rarely
SPARSITY_SILENT_UNITS = "sparsity/silent_units"


def layer_activity(layer: int) -> str:
    return f"sparsity/activity/layer_{layer}"


def layer_silent_units(layer: int) -> str:
    return f"sparsity/silent_units/layer_{layer}"


# --- metrics: operations per token ----------------------------------------------------
OPS_DENSE = "ops/dense_macs_per_token"
OPS_WEIGHT_SPARSE = "ops/weight_sparse_macs_per_token"
OPS_EFFECTIVE = "ops/effective_macs_per_token"
OPS_MULTIPLICATIVE = "ops/multiplicative_estimate_per_token"
OPS_DECODER_DENSE = "ops/decoder_dense_macs_per_token"
OPS_DECODER_WEIGHT_SPARSE = "ops/decoder_weight_sparse_macs_per_token"
OPS_DECODER_EFFECTIVE = "ops/decoder_effective_macs_per_token"
OPS_TOTAL_DENSE = "ops/total_dense_macs_per_token"
OPS_TOTAL_WEIGHT_SPARSE = "ops/total_weight_sparse_macs_per_token"
OPS_TOTAL_EFFECTIVE = "ops/total_effective_macs_per_token"
OPS_COMPUTE_REDUCTION = "ops/compute_reduction"  # dense / effective, recurrent layers
OPS_TOTAL_COMPUTE_REDUCTION = "ops/total_compute_reduction"  # the same with the decoder

# --- metrics: speed -------------------------------------------------------------------
PERF_TOKENS_PER_S = "perf/tokens_per_s"
PERF_EPOCH_S = "perf/epoch_s"

# --- metrics: simulated hardware ------------------------------------------------------
HW_SPINNAKER2_PREFIX = "hw/spinnaker2/"


def spinnaker2(figure: str) -> str:
    return HW_SPINNAKER2_PREFIX + figure


# The figures `duosparse simulate spinnaker2` logs as hw/spinnaker2/<figure>; per token unless
# the name says otherwise.
SPINNAKER2_FIGURES = (
    "energy_per_token_j",
    "latency_per_token_s",
    "compute_latency_per_token_s",
    "power_w",
    "pes",
    "chips",
    "chips_needed",
    "fits",
    "max_pe_bytes",
    "macs_per_token",
    "events_per_token",
    "gpu_energy_per_token_j",
    "gpu_latency_per_token_s",
    "gpu_power_w",
    "energy_gain_vs_gpu",
    "speedup_vs_gpu",
)


# --- artifacts ------------------------------------------------------------------------
ARTIFACT_CONFIG = "config.yaml"
ARTIFACT_CHECKPOINT = "model.pt"
ARTIFACT_ACTIVITY = "activity.json"  # per-layer activity and per-unit event rates (test split)
ARTIFACT_SPINNAKER2 = "spinnaker2.json"  # the full deployment result, options included
ARTIFACT_SPEC = "spec.yaml"  # on a sweep's launch run: the spec as that launch read it
ARTIFACTS_ANALYSIS = "analysis"  # folder on a sweep's parent run: report, tables, figures
ARTIFACTS_PARETO = "analysis/pareto"  # folder for `duosparse export pareto`

# The metrics every finished training run has (DESIGN section 5), for tests and the run table.
RUN_METRICS = (
    TRAIN_LOSS,
    VAL_LOSS,
    VAL_PPL,
    TEST_LOSS,
    TEST_PPL,
    SPARSITY_WEIGHT,
    SPARSITY_ACTIVITY,
    OPS_DENSE,
    OPS_WEIGHT_SPARSE,
    OPS_EFFECTIVE,
    OPS_MULTIPLICATIVE,
    OPS_TOTAL_EFFECTIVE,
    OPS_COMPUTE_REDUCTION,
    PERF_TOKENS_PER_S,
    PERF_EPOCH_S,
)

# The metrics a training run logs itself, which a search (`search:` in a sweep spec) may
# minimise, maximise or constrain; hw/spinnaker2/* come later, from `duosparse simulate`.
SEARCH_METRICS = (
    VAL_LOSS,
    VAL_PPL,
    TEST_LOSS,
    TEST_PPL,
    TRAIN_LOSS,
    SPARSITY_WEIGHT,
    SPARSITY_ACTIVITY,
    SPARSITY_SILENT_UNITS,
    OPS_DENSE,
    OPS_WEIGHT_SPARSE,
    OPS_EFFECTIVE,
    OPS_MULTIPLICATIVE,
    OPS_DECODER_DENSE,
    OPS_DECODER_WEIGHT_SPARSE,
    OPS_DECODER_EFFECTIVE,
    OPS_TOTAL_DENSE,
    OPS_TOTAL_WEIGHT_SPARSE,
    OPS_TOTAL_EFFECTIVE,
    OPS_COMPUTE_REDUCTION,
    OPS_TOTAL_COMPUTE_REDUCTION,
    PERF_TOKENS_PER_S,
)
TAG_SEARCH = "duosparse.search"  # on a search trial: the algorithm and seed ("tpe, seed 0")
# on a launch run whose search stage drew all its samples: how many trials it ended with
# ("duosparse.search_done" for a spec without stages, "duosparse.search_done.<stage>" else)
TAG_SEARCH_DONE = "duosparse.search_done"


def search_done_tag(stage: str | None) -> str:
    return TAG_SEARCH_DONE + (f".{stage}" if stage else "")


# --- pruning sensitivity (`duosparse prune sensitivity`, logged into the analysed run) ----
ARTIFACT_SENSITIVITY = "sensitivity.json"  # the table: one row per prunable tensor x level
SENSITIVITY_PREFIX = "sensitivity/"
SENSITIVITY_BASELINE = "sensitivity/baseline"  # val/ppl of the checkpoint as it is


def sensitivity_metric(tensor: str, level: float) -> str:
    """val/ppl with `tensor` (e.g. layers.0.weight_hh) alone pruned to `level`, not retrained."""
    return f"{SENSITIVITY_PREFIX}{tensor}/{level:g}"
