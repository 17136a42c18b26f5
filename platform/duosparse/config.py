"""RunConfig: everything that defines one training run, validated by pydantic.

A config file names only what it changes; every key has a default. The canonical JSON
of a config (defaults filled, keys sorted) hashed with sha256 is the run's `run_key`:
equal configs are the same run everywhere (dedup, resume, caching).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .schema import TAG_RUN_KEY


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and the fix."""


class _Section(BaseModel):
    # Unknown keys are errors, not silently ignored: a typo must never run the wrong study.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    corpus: Literal["ptb", "wikitext-2", "synthetic"] = "ptb"
    dir: str | None = None  # a folder holding <corpus>/{train,valid,test}.txt


class PseudoDerivative(_Section):
    height: float = Field(3.6, gt=0)
    width: float = Field(3.6, gt=0)


class Dropout(_Section):
    """AWD-LSTM style regularisation; all off by default."""

    embedding: float = Field(0.0, ge=0, lt=1)  # drops whole words from the embedding
    input: float = Field(0.0, ge=0, lt=1)  # locked dropout on the first layer's input
    hidden: float = Field(0.0, ge=0, lt=1)  # locked dropout between recurrent layers
    output: float = Field(0.0, ge=0, lt=1)  # locked dropout before the decoder
    weight: float = Field(0.0, ge=0, lt=1)  # DropConnect on the recurrent matrices


class ActivityRegularizer(_Section):
    """EGRU only. `squared`: adds weight * (mean event rate - target)^2 to the training loss;
    `linear`: weight * mean event rate (EvNN's `--gamma`), which always pushes towards silence."""

    kind: Literal["squared", "linear"] = "squared"
    weight: float = Field(0.0, ge=0)
    target: float = Field(0.0, ge=0, le=1)  # squared only


class ActivationRegularizer(_Section):
    """AWD-LSTM's AR and TAR on the last layer's output h (any architecture): adds
    ar * mean(dropout(h)^2) + tar * mean((h_t - h_{t-1})^2) to the training loss."""

    ar: float = Field(0.0, ge=0)  # AWD-LSTM --alpha (2)
    tar: float = Field(0.0, ge=0)  # AWD-LSTM --beta (1)


class ModelConfig(_Section):
    arch: Literal["lstm", "gru", "egru"] = "egru"
    embedding_size: int = Field(128, ge=1)
    hidden_size: int = Field(256, ge=1)
    num_layers: int = Field(2, ge=1)
    tie_weights: bool = True
    # EGRU thresholds. `threshold` is the "activity threshold" axis of a sweep: the value of
    # every unit's threshold (`constant`) or the mean of their Beta(a, threshold_beta) draws
    # (`beta`, EvNN: a = threshold_beta * mean / (1 - mean), one draw per unit).
    threshold: float = Field(0.0, ge=0)
    threshold_init: Literal["constant", "beta"] = "constant"
    threshold_beta: float = Field(3.0, gt=0)
    threshold_max: float | None = Field(None, gt=0)  # clamp to [0, max] after each step (EvNN: 1)
    # Recurrent weights: `uniform` +-1/sqrt(H) as torch.nn.LSTM/GRU; `xavier_normal` (EvNN);
    # `orthogonal`: xavier_normal input weights, an orthogonal block per gate in weight_hh.
    weight_init: Literal["uniform", "xavier_normal", "orthogonal"] = "uniform"
    # Recurrent and decoder biases: `uniform` as torch.nn; `zeros` (EvNN).
    bias_init: Literal["uniform", "zeros"] = "uniform"
    # The decoder's bias starts at log p(word) of the training split (add-one smoothed), so
    # the model starts at the unigram model's perplexity. Without it a deep stack spends its
    # first thousand Adam steps learning word frequencies one lr-sized step per weight, on a
    # plateau it leaves late (docs/results/reproductions.md, reproduction 1).
    unigram_decoder_bias: bool = False
    # Added to the bias of the gate that keeps the state (LSTM forget gate, GRU and EGRU update
    # gate) after init: deep stacks remember from the start (Jozefowicz et al. 2015: 1).
    carry_gate_bias: float = Field(0.0, allow_inf_nan=False)
    pseudo_derivative: PseudoDerivative = PseudoDerivative()
    # What the decoder reads of the EGRU's top layer: its `events` y = o * c (EvNN), or its
    # `state` c, every unit at every step. `state` is not EvNN's model: it is the ablation of
    # docs/results/reproductions.md 2k-2l (the events' readout is most of the EGRU's gap to a
    # GRU), and it makes the decoder dense. The layers' recurrences and the layers above still
    # read events.
    readout: Literal["events", "state"] = "events"
    dropout: Dropout = Dropout()
    activity_regularizer: ActivityRegularizer = ActivityRegularizer()
    activation_regularizer: ActivationRegularizer = ActivationRegularizer()

    @field_validator("hidden_size", "embedding_size", "num_layers", mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # YAML `true` would otherwise pass as 1
            raise ValueError(f"expected an integer, got {value!r}")
        return value

    @model_validator(mode="after")
    def _thresholds(self) -> ModelConfig:
        if self.threshold_init == "beta" and not 0 < self.threshold < 1:
            raise ValueError(
                f"model.threshold ({self.threshold}) is the mean of a Beta distribution under "
                "model.threshold_init: beta and must lie strictly between 0 and 1; use for example "
                "0.01 (EvNN), or threshold_init: constant for a threshold of 0"
            )
        if self.threshold_max is not None and self.threshold > self.threshold_max:
            raise ValueError(
                f"model.threshold ({self.threshold}) is above model.threshold_max "
                f"({self.threshold_max}); raise threshold_max or lower the threshold"
            )
        return self

    @model_validator(mode="after")
    def _readout(self) -> ModelConfig:
        if self.readout == "state" and self.arch != "egru":
            raise ValueError(
                f"model.readout: state reads the EGRU's state instead of its events, but "
                f"model.arch is {self.arch}, whose every unit reaches the decoder already; set "
                "it under a sweep's conditional for model.arch: egru, or leave readout at events"
            )
        return self

    @model_validator(mode="after")
    def _hidden_size_matters(self) -> ModelConfig:
        # with tying, the last layer's width is embedding_size: a 1-layer tied model has no
        # hidden_size, and sweeping it would train the same model twice under two names
        if self.tie_weights and self.num_layers == 1 and self.hidden_size != self.embedding_size:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) has no effect: with model.tie_weights and "
                f"one layer, the layer's width is model.embedding_size ({self.embedding_size}); "
                "set hidden_size equal to embedding_size, use num_layers >= 2, or tie_weights: false"
            )
        return self


class PruneConfig(_Section):
    target_sparsity: float = Field(0.0, ge=0, lt=1)
    schedule: Literal["none", "oneshot", "gradual", "iterative"] = "none"
    scope: Literal["layer", "global"] = "layer"
    start_epoch: int = Field(1, ge=1)
    end_epoch: int = Field(1, ge=1)
    include_embedding: bool = False
    update_every: int = Field(50, ge=1)  # steps between gradual-schedule updates
    iterative_steps: int = Field(3, ge=1)  # equal pruning steps of the iterative schedule

    @model_validator(mode="after")
    def _ordered(self) -> PruneConfig:
        if self.schedule in ("gradual", "iterative") and self.end_epoch < self.start_epoch:
            raise ValueError(
                f"prune.end_epoch ({self.end_epoch}) must be >= prune.start_epoch "
                f"({self.start_epoch}) for the {self.schedule} schedule"
            )
        return self


class TrainConfig(_Section):
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(10, ge=1)
    bptt: int = Field(35, ge=2)
    variable_bptt: bool = False  # AWD-LSTM's random sequence lengths
    # ntasgd: AWD-LSTM's non-monotonically triggered averaged SGD: SGD until the validation loss
    # is worse than the best of all epochs but the last `nonmono`, then averaged SGD (ASGD),
    # whose running average of the weights is what is validated, kept and tested.
    optimizer: Literal["adam", "adamw", "sgd", "ntasgd"] = "adam"
    nonmono: int = Field(5, ge=1)  # ntasgd only
    betas: tuple[float, float] = (0.9, 0.999)  # Adam / AdamW (EvNN: 0, 0.999)
    lr: float = Field(2e-3, gt=0, allow_inf_nan=False)
    # The schedule, applied per step (docs/design.md, "Schedules"):
    #   constant; cosine: lr held until decay_start_epoch, then half a cosine to 0 at the end;
    #   step: lr *= lr_decay_factor after each epoch in step_epochs;
    #   plateau: lr *= lr_decay_factor after an epoch whose validation loss is not a new best
    #   (plateau_patience such epochs in a row).
    # Any of them after a linear warmup from 0 over warmup_epochs (may be a fraction).
    lr_schedule: Literal["constant", "cosine", "step", "plateau"] = "constant"
    warmup_epochs: float = Field(0.0, ge=0, allow_inf_nan=False)
    decay_start_epoch: int = Field(1, ge=1)  # cosine only (EvNN's --scheduler_start + 1)
    step_epochs: list[int] = Field(default_factory=list)  # step only
    lr_decay_factor: float = Field(0.25, gt=0, lt=1)  # step and plateau
    plateau_patience: int = Field(0, ge=0)  # plateau only
    threshold_lr_factor: float = Field(1.0, ge=0)  # EGRU thresholds' lr = lr * this; 0 freezes them
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)  # SGD only
    clip: float = Field(0.25, ge=0)  # gradient-norm clipping over the model; 0 disables it
    layer_clip: float = Field(0.0, ge=0)  # EvNN: each EGRU layer's gradient norm clipped first
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_steps_per_epoch: int | None = Field(None, ge=1)
    max_eval_batches: int | None = Field(None, ge=1)  # cap on evaluation chunks, for quick runs
    test_batch_size: int | None = Field(None, ge=1)  # final test split; None: eval_batch_size
    on_silent_start: Literal["warn", "error"] = "warn"  # an EGRU layer without events at init

    @field_validator("epochs", "batch_size", "eval_batch_size", "bptt", mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        return value

    @field_validator("betas")
    @classmethod
    def _betas(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(
                f"each of train.betas must be in [0, 1), got {list(betas)}; EvNN uses [0, 0.999]"
            )
        return betas

    @model_validator(mode="after")
    def _schedule(self) -> TrainConfig:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"train.warmup_epochs ({self.warmup_epochs}) is not shorter than training "
                f"(train.epochs = {self.epochs}); warm up for a fraction of the run"
            )
        if self.lr_schedule == "step":
            if not self.step_epochs:
                raise ValueError(
                    "train.step_epochs is empty under lr_schedule: step; list the epochs after which the lr drops, e.g. [4, 6]"
                )
            bad = [e for e in self.step_epochs if not 1 <= e < self.epochs]
            if bad:
                raise ValueError(
                    f"train.step_epochs {bad} must lie in [1, train.epochs) = [1, {self.epochs})"
                )
        if self.lr_schedule == "cosine" and self.decay_start_epoch > self.epochs:
            raise ValueError(
                f"train.decay_start_epoch ({self.decay_start_epoch}) is after train.epochs "
                f"({self.epochs}): the cosine would never start"
            )
        return self


# The keys a warm start must share with the run it starts from: they fix the parameters'
# shapes and the vocabulary. Everything else (training, pruning, dropout) may change.
WARM_START_KEYS = (
    "data.corpus",
    "model.arch",
    "model.embedding_size",
    "model.hidden_size",
    "model.num_layers",
    "model.tie_weights",
)


class InitConfig(_Section):
    # Warm start: begin from the final weights (EGRU thresholds and any masks included) of the
    # FINISHED run with this run_key, found in the same MLflow store; the optimizer starts
    # fresh. Part of the run_key, so a fine-tune of another model is another run.
    from_run_key: str | None = None

    @field_validator("from_run_key")
    @classmethod
    def _full_key(cls, key: str | None) -> str | None:
        if key is not None and not re.fullmatch(r"[0-9a-f]{64}", key):
            raise ValueError(
                f"init.from_run_key must be a whole run_key (64 hex digits, the run's "
                f"'{TAG_RUN_KEY}' tag in MLflow), got {key!r}"
            )
        return key


# Keys added after stores with runs existed: at their default they stay out of the run_key,
# so those runs keep their keys (and a re-run sweep finds them FINISHED); set, they enter it.
KEYS_OUT_OF_IDENTITY_AT_DEFAULT: tuple[str, ...] = ("model.unigram_decoder_bias", "model.readout")


class RunConfig(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    prune: PruneConfig = PruneConfig()
    train: TrainConfig = TrainConfig()
    init: InitConfig = InitConfig()

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        p = self.prune
        if p.schedule != "none" and p.target_sparsity > 0:
            last = p.start_epoch if p.schedule == "oneshot" else p.end_epoch
            if last > self.train.epochs:
                raise ValueError(
                    f"prune.{'start_epoch' if p.schedule == 'oneshot' else 'end_epoch'} "
                    f"({last}) is after train.epochs ({self.train.epochs}): the {p.schedule} "
                    "schedule could not reach prune.target_sparsity; raise train.epochs or "
                    "move the schedule earlier"
                )
        if p.schedule == "none" and p.target_sparsity > 0:
            raise ValueError(
                f"prune.target_sparsity is {p.target_sparsity} but prune.schedule is 'none'; "
                "choose oneshot, gradual or iterative"
            )
        return self

    # --- identity -------------------------------------------------------------------
    def canonical_json(self) -> str:
        tree = self.model_dump(mode="json")
        for dotted in KEYS_OUT_OF_IDENTITY_AT_DEFAULT:
            section, key = dotted.split(".")
            if tree[section][key] == type(getattr(self, section)).model_fields[key].default:
                del tree[section][key]
        return json.dumps(tree, sort_keys=True, separators=(",", ":"))

    @property
    def run_key(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def flat(self) -> dict[str, Any]:
        """Dotted keys (`model.arch`, `prune.target_sparsity`, ...) -> values, for MLflow params."""
        return flatten(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --- loading ------------------------------------------------------------------------


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """tree['a']['b'] = value for 'a.b', creating sections as needed."""
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"Config key '{dotted}': '{part}' is a value, not a section.")
        node = child
    node[leaf] = value


def parse_override(text: str, example: str = "model.hidden_size=512") -> tuple[str, Any]:
    """'model.hidden_size=512' -> ('model.hidden_size', 512); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(
            f"--set '{text}' is not of the form key=value; write for example --set {example}."
        )
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def _section_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The valid keys of the section of `model` that holds `loc`, for 'did you mean' messages."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return []
        model = field.annotation
    return list(model.model_fields)


def describe_validation_error(
    error: ValidationError, model: type[BaseModel], noun: str = "config key"
) -> str:
    """pydantic's errors as one line per field, each naming the field and what it accepts
    (a config's and a sweep spec's messages alike)."""
    lines = []
    for e in error.errors():
        field = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            keys = ", ".join(_section_keys(model, e["loc"]))
            lines.append(f"'{field}' is not a {noun} (valid keys here: {keys})")
        elif e["type"] == "value_error":
            message = e["msg"].removeprefix("Value error, ")
            lines.append(message if message.startswith(field) else f"'{field}': {message}")
        elif e["type"] == "model_type":  # a value where a section belongs
            keys = ", ".join(_section_keys(model, (*e["loc"], "")))
            lines.append(
                f"'{field}' is a section, not a value (got {e.get('input')!r}); set one of its keys "
                f"instead: {keys}"
            )
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"'{field}': {e['msg']}{shown}")
    return "; ".join(lines)


def build_config(tree: dict[str, Any] | None, source: str = "config") -> RunConfig:
    """Validate a nested dict into a RunConfig, raising ConfigError with the fields named."""
    try:
        return RunConfig.model_validate(tree or {})
    except ValidationError as e:
        raise ConfigError(f"Invalid {source}: {describe_validation_error(e, RunConfig)}.") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep the last one
    without a word, silently dropping the first section)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key '{key}' appears twice in the same mapping; keep one",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path, what: str, example: str, error: type[Exception]) -> Any:
    """safe_load a YAML file, raising `error` with a one-line fix when it is missing or bad."""
    if not path.is_file():
        raise error(f"{what} '{path}' does not exist; pass the path of {example}.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(
            f"{what} '{path}' is not a text file (not UTF-8: byte {e.start}); pass the path of "
            f"{example}."
        ) from None
    except OSError as e:
        raise error(
            f"{what} '{path}' cannot be read ({e.strerror}); check its permissions."
        ) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise error(f"{what} '{path}' is not valid YAML: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML RunConfig (or start from defaults) and apply `key=value` overrides."""
    tree: dict[str, Any] = {}
    source = "config (defaults and --set)"
    if path is not None:
        path = Path(path)
        source = str(path)
        loaded = read_yaml(
            path, "Config file", "a YAML RunConfig such as configs/default.yaml", ConfigError
        )
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"Config file '{path}' must hold a mapping of sections (data, model, prune, train)."
            )
        tree = loaded or {}
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
    return build_config(tree, source)
