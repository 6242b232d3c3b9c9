"""The pipeline spec (CONTRACT section 2): a pydantic model, loaded from YAML or JSON.

An invalid spec is refused before anything runs, with one line per problem:
`pipelines/digits.yaml: hyperparameters.learning_rate: must be > 0 (got -1)`.
Unknown keys are refused with a "did you mean" suggestion. Checks that need torch (do
`model.params` fit the architecture's constructor?) are injected by the caller as a
`ParamChecker`, so this module stays free of ml/ and torch. Besides pydantic it imports PyYAML, only
to read the document, and croniter, which checks `triggers.schedule.cron` field by field.

Decision on precision: `fp16` with `device: cpu` is an error (CPU fp16 autocast is not a
training mode we support; use `bf16`). With `device: auto` the spec is valid and training falls
back to fp32 with a warning when no CUDA device is present, because the machine that validates a
spec is often not the one that trains it.
"""

from __future__ import annotations

import difflib
import itertools
import json
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from domain.data_spec import DataSpec
from domain.errors import SpecError
from domain.init_spec import InitSpec
from domain.notification_spec import NotificationsSpec
from domain.outcomes import RolloutStatus
from domain.param_group_spec import ParamGroupSpec
from domain.settings import split_address
from domain.task import (
    BUILTIN_LOSSES,
    DEFAULT_LOSS,
    DEFAULT_MAX_ACCURACY_DROP,
    REGRESSION_DRIFT_BINS,
    TASKS,
    Task,
    metric_problem,
    task_metrics,
    task_problems,
)
from domain.trigger_spec import TriggersSpec
from domain.tuning_spec import TuningSpec, tuning_problems

ParamChecker = Callable[[str, dict[str, Any]], list[tuple[str, str]]]
"""(architecture, params) → [(param key, problem)]; ml.zoo.constructor_problems is one."""

# Metrics a classifier's evaluation produces; gates may name these or the spec's custom metrics
# (domain/task.py has each task's list).
BUILTIN_METRICS = task_metrics("classification")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,99}$")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveInt = Annotated[int, Field(gt=0)]


class ModelSpec(_Strict):
    architecture: str
    params: dict[str, Any] = Field(default_factory=dict)
    input_shape: list[PositiveInt] = Field(min_length=1, max_length=4)
    output_classes: int | None = Field(default=None, ge=2, description="Classification: the number of classes.")
    outputs: int | None = Field(
        default=None, ge=1, description="Regression: floats predicted per row, one per data.target column (default 1)."
    )
    freeze: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list,
        description="Parameter-name prefixes kept frozen (whole dotted parts: 'encoder' freezes "
        "'encoder.layer.0.weight', not 'encoders.x'); each must match a parameter of the built model.",
    )
    init: InitSpec | None = Field(default=None, description="Starting weights; None: random (from scratch).")


class LRScheduleSpec(_Strict):
    type: Literal["none", "cosine_warm_restarts", "step", "linear_warmup"] = "none"
    t0: PositiveInt = 10
    t_mult: PositiveInt = 1
    eta_min: float = Field(default=0.0, ge=0)
    step_size: PositiveInt = 10
    gamma: float = Field(default=0.1, gt=0, le=1)
    warmup_steps: int = Field(default=0, ge=0)


class EarlyStoppingSpec(_Strict):
    monitor: str = Field(default="val_loss", description="val_loss, val_accuracy (classification), val_rmse, val_mae.")
    patience: PositiveInt = 5
    min_delta: float = Field(default=0.0, ge=0)


class HyperparametersSpec(_Strict):
    optimizer: str = Field(default="adamw", description="adamw, adam, sgd or 'package.module:Class'.")
    optimizer_params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the optimizer.")
    callbacks: list[str] = Field(default_factory=list, description="'package.module:Class' per callback.")
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    batch_size: PositiveInt = 64
    epochs: PositiveInt = 10
    loss_function: str = Field(
        default="cross_entropy",
        description="'cross_entropy' (classification), 'mse', 'mae', 'huber' (regression; the default there is "
        "mse), or a loss by import path 'package.module:function' called as fn(outputs, targets) -> scalar tensor.",
    )
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    huber_delta: float = Field(default=1.0, gt=0, description="Where the huber loss turns from quadratic to linear.")
    lr_schedule: LRScheduleSpec = Field(default_factory=LRScheduleSpec)
    gradient_clip_norm: float | None = Field(default=None, gt=0)
    gradient_accumulation_steps: PositiveInt = 1
    early_stopping: EarlyStoppingSpec | None = None
    checkpoint_every_steps: PositiveInt | None = None
    param_groups: list[ParamGroupSpec] = Field(
        default_factory=list,
        description="Per-group lr_scale and weight_decay; first match wins; unmatched parameters use the defaults.",
    )

    @field_validator("optimizer")
    @classmethod
    def _optimizer(cls, value: str) -> str:
        module_name, sep, attribute = value.partition(":")
        if value not in ("adamw", "adam", "sgd") and not (sep and module_name and attribute):
            raise ValueError(f"must be adamw, adam, sgd or an import path 'package.module:Class' (got {value!r})")
        return value

    @field_validator("loss_function")
    @classmethod
    def _loss(cls, value: str) -> str:
        module_name, sep, attribute = value.partition(":")
        builtins = [name for task in TASKS for name in BUILTIN_LOSSES[task]]
        if value not in builtins and not (sep and module_name and attribute):
            raise ValueError(
                f"must be {', '.join(builtins)} or an import path 'package.module:function' (got {value!r})"
            )
        return value


class HardwareSpec(_Strict):
    device: str = "auto"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    gradient_checkpointing: bool = False

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N (got {value!r})")
        return value

    @model_validator(mode="after")
    def _precision_fits_device(self) -> HardwareSpec:
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError("precision fp16 needs a CUDA device; on CPU use bf16 (or fp32), or set device: cuda")
        return self


class DistributedSpec(_Strict):
    """`ddp`: the train task launches torchrun (flows/distributed.py). The node keys, when unset, come
    from RETRAINER_DDP_NNODES / _NODE_RANK / _RDZV_ENDPOINT (domain/settings.py), else one node."""

    strategy: Literal["none", "ddp"] = "none"
    num_workers: PositiveInt = Field(default=1, description="Processes per node (torchrun --nproc-per-node).")
    nnodes: PositiveInt | None = None
    node_rank: int | None = Field(default=None, ge=0)
    rdzv_endpoint: str | None = Field(default=None, description="HOST:PORT of node 0, where the ranks meet.")

    @model_validator(mode="after")
    def _workers(self) -> DistributedSpec:
        if self.strategy == "ddp" and self.num_workers < 2:
            raise ValueError(f"ddp needs num_workers >= 2 processes (got {self.num_workers}); or use strategy: none")
        if self.rdzv_endpoint is not None:
            split_address(self.rdzv_endpoint)
        if self.nnodes is not None and self.node_rank is not None and self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes} (ranks count from 0)")
        return self


class QuantizationSpec(_Strict):
    type: Literal["none", "dynamic", "static", "fp16"] = "none"
    bit_width: Literal[8] = 8
    calibration_batches: PositiveInt = 16
    max_accuracy_drop: float = Field(default=DEFAULT_MAX_ACCURACY_DROP, ge=0, le=1)
    max_metric_drop: dict[str, Annotated[float, Field(ge=0)]] | None = Field(
        default=None,
        description="The most one named quality metric may worsen, e.g. {rmse: 0.5} or {accuracy: 0.01}; "
        "required for a quantized regression model.",
    )

    def budget(self, task: Task) -> tuple[str, float]:
        """(metric, the most it may worsen): max_metric_drop's entry, else accuracy with max_accuracy_drop."""
        if self.max_metric_drop:
            return next(iter(self.max_metric_drop.items()))
        # a regression spec without a budget is one without quantization (the spec refuses the rest):
        # only the float model is scored, so nothing may be lost
        return ("accuracy", self.max_accuracy_drop) if task == "classification" else ("rmse", 0.0)


class VsChampionSpec(_Strict):
    min_delta: float | None = None
    max_ratio: float | None = Field(default=None, gt=0)
    confidence: float = Field(default=0.95, gt=0, lt=1)
    mode: Literal["superiority", "non_inferiority"] = "superiority"

    @model_validator(mode="after")
    def _one_rule(self) -> VsChampionSpec:
        if self.min_delta is None and self.max_ratio is None:
            raise ValueError("needs min_delta (quality metrics) or max_ratio (cost metrics such as latency)")
        return self


class GatesSpec(_Strict):
    min: dict[str, float] = Field(default_factory=dict)
    max: dict[str, float] = Field(default_factory=dict)
    vs_champion: dict[str, VsChampionSpec] = Field(default_factory=dict)
    max_class_recall_drop: float | None = Field(
        default=None, gt=0, le=1, description="Per-class guard: no class's recall may drop more than this."
    )
    min_test_examples: int | None = Field(
        default=None, gt=0, description="Override the evidence rule n >= 5 / (1 - confidence)."
    )


class FreezeWindowSpec(_Strict):
    start: datetime
    end: datetime

    @model_validator(mode="after")
    def _ordered(self) -> FreezeWindowSpec:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("start and end need a time zone, e.g. 2026-12-20T00:00:00Z")
        if self.end <= self.start:
            raise ValueError(f"end ({self.end.isoformat()}) must be after start ({self.start.isoformat()})")
        return self


class ApprovalSpec(_Strict):
    """A person approves each candidate that passes the gate before its canary or promotion
    (flows/approvals.py); the run waits as `awaiting_approval` meanwhile."""

    required: bool = Field(default=False, description="Wait for an approve or reject after the gate passes.")
    timeout_seconds: float = Field(
        default=86400, gt=0, description="Unanswered this long after the gate passed: rejected (fail closed)."
    )


class PromotionSpec(_Strict):
    """Guards on moving the champion (an extension of the contract's spec)."""

    cooldown_seconds: float = Field(default=0, ge=0, description="Minimum time between two promotions.")
    freeze_windows: list[FreezeWindowSpec] = Field(default_factory=list)
    approval: ApprovalSpec = Field(default_factory=ApprovalSpec)


class CanarySpec(_Strict):
    steps: list[float] = Field(default_factory=lambda: [10.0, 25.0, 50.0, 100.0], min_length=1)
    interval_seconds: float = Field(default=30, gt=0)
    min_requests: PositiveInt = 200
    max_error_rate: float = Field(default=0.01, ge=0, le=1)
    max_latency_p99_ratio: float = Field(default=1.2, gt=0)
    failure_limit: PositiveInt = 1
    # extensions: prediction drift, delayed-label accuracy, how long a step may wait for traffic
    max_prediction_psi: float = Field(default=0.2, gt=0, description="Population stability index limit.")
    min_labels: PositiveInt = Field(default=50, description="Feedback labels per variant before accuracy counts.")
    max_accuracy_drop: float = Field(default=0.02, ge=0, le=1)
    max_error_increase: float = Field(
        default=0.1,
        ge=0,
        description="Regression: the most the canary's mean absolute error on delayed labels may exceed the "
        "champion's, relative (0.1: 10 %).",
    )
    step_deadline_factor: float = Field(default=3.0, ge=1, description="A step waits up to this many intervals.")
    latency_p99_slack_ms: float = Field(
        default=0.0,
        ge=0,
        description="Latency fails a step only if the canary is slower than ratio x champion + this many ms: on "
        "a latency of a few ms, scheduler jitter alone moves the ratio.",
    )
    confidence: float = Field(
        default=0.95,
        gt=0,
        lt=1,
        description="1 - the chance that a candidate as good as the champion is rolled back by any check of the "
        "whole rollout (all steps, checks and looks; domain/sequential.py splits it).",
    )

    @field_validator("steps")
    @classmethod
    def _rising_to_100(cls, steps: list[float]) -> list[float]:
        if any(not 0 < s <= 100 for s in steps):
            raise ValueError(f"each step is a traffic percent in (0, 100] (got {steps})")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError(f"steps must rise (got {steps})")
        if steps[-1] != 100:
            raise ValueError(f"steps must end at 100 (got {steps})")
        return steps

    def traffic_percent(self, step_index: int, status: RolloutStatus = RolloutStatus.ACTIVE) -> float:
        """The candidate's share of traffic at that step (0-based) of a rollout in that state: the
        step's planned percent while active (past the last step, the last: 100), 100 once promoted,
        0 after any other end. The one place the share is computed: the controller's decisions, the
        model server's weight and the API's answer all come from here."""
        if status is not RolloutStatus.ACTIVE:
            return 100.0 if status is RolloutStatus.PROMOTED else 0.0
        return float(self.steps[min(max(step_index, 0), len(self.steps) - 1)])

    def is_last_step(self, step_index: int) -> bool:
        return step_index >= len(self.steps) - 1


class EvaluationSpec(_Strict):
    custom_metrics: list[str] = Field(default_factory=list, description="'package.module:function' paths")
    bootstrap_resamples: int = Field(default=1000, ge=1000)
    latency_budget_seconds: float = Field(default=2.0, gt=0, description="Time spent measuring CPU latency.")


class PipelineSpec(_Strict):
    name: str
    task: Task = Field(default="classification", description="classification or regression (domain/task.py).")
    dataset: str = Field(min_length=1)
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec
    hyperparameters: HyperparametersSpec = Field(default_factory=HyperparametersSpec)
    hardware: HardwareSpec = Field(default_factory=HardwareSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    gates: GatesSpec = Field(default_factory=GatesSpec)
    promotion: PromotionSpec = Field(default_factory=PromotionSpec)
    canary: CanarySpec | None = None
    triggers: TriggersSpec = Field(default_factory=TriggersSpec)
    tuning: TuningSpec | None = Field(default=None, description="A hyperparameter search (domain/tuning_spec.py).")
    notifications: NotificationsSpec = Field(
        default_factory=NotificationsSpec, description="Webhooks for decision events (domain/notification_spec.py)."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"must be lowercase letters, digits, '-' or '_', starting with a letter or digit (got {value!r})"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, document: Any) -> Any:
        """A regression spec's defaults that differ from a classifier's: loss mse, one output."""
        if not isinstance(document, dict) or document.get("task") != "regression":
            return document
        document = dict(document)
        for section, key, value in (("hyperparameters", "loss_function", DEFAULT_LOSS["regression"]),):
            part = document.get(section)
            if part is None or (isinstance(part, dict) and key not in part):
                document[section] = {**(part or {}), key: value}
        return document

    @model_validator(mode="after")
    def _cross_section(self) -> PipelineSpec:
        problems = task_problems(self)
        stopping = self.hyperparameters.early_stopping
        if stopping is not None and self.data.validation_fraction == 0:
            problems.append(
                f"hyperparameters.early_stopping: monitors {stopping.monitor} but data.validation_fraction is 0; "
                "set a validation fraction or remove early_stopping"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def output_width(self) -> int:
        """The model's output width: the classes of a classifier, the outputs of a regression model."""
        if self.task == "regression":
            return self.model.outputs or 1
        return int(self.model.output_classes or 0)

    @property
    def prediction_categories(self) -> int:
        """What the canary's prediction drift check counts over: classes, or a regression model's bins."""
        return REGRESSION_DRIFT_BINS if self.task == "regression" else self.output_width

    def metric_names(self) -> set[str]:
        """Metrics the gates may name: the task's built-ins and the custom ones by function name."""
        return set(task_metrics(self.task)) | {path.rpartition(":")[2] for path in self.evaluation.custom_metrics}

    def to_document(self) -> dict[str, Any]:
        """JSON-safe dict, as stored with the pipeline row (and hashed to detect changes)."""
        return self.model_dump(mode="json")


# ----------------------------------------------------------------------------- loading


def _duplicate_refusing_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that refuses duplicate keys instead of silently keeping the last one."""

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError as e:  # YAML allows a list or mapping as a key (`? [a, b]`); Python cannot hash it
                problem = f"a {key_node.id} used as a key; keys must be plain names"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark) from e
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


def read_document(path: Path) -> Any:
    """The parsed YAML/JSON document, or SpecError naming the file and the parse problem."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise SpecError([f"{source}: file not found"]) from e
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError([f"{source}: cannot read ({e})"]) from e
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError([f"{source}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"]) from e
    import yaml

    try:
        return yaml.load(text, Loader=_duplicate_refusing_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError([f"{source}: invalid YAML{where}: {problem}"]) from e


def load_spec(path: Path, param_checker: ParamChecker | None = None) -> PipelineSpec:
    """Reads and validates one spec file; SpecError lists every problem, one line each."""
    return parse_spec(read_document(path), source=str(path), param_checker=param_checker)


def parse_spec(document: Any, *, source: str, param_checker: ParamChecker | None = None) -> PipelineSpec:
    if not isinstance(document, dict):
        raise SpecError(
            [f"{source}: a pipeline spec is a mapping of keys (name, dataset, model, …), not {_kind(document)}"]
        )
    problems: list[str] = []
    spec: PipelineSpec | None = None
    try:
        spec = PipelineSpec.model_validate(document)
    except ValidationError as e:
        problems += _describe(e)
    # The semantic checks read the raw document, so one run reports schema AND semantic problems.
    problems += semantic_problems(document, param_checker)
    if problems or spec is None:
        raise SpecError([f"{source}: {line}" for line in problems])
    return spec


def semantic_problems(document: dict[str, Any], param_checker: ParamChecker | None) -> list[str]:
    """Checks beyond the schema: model params against the constructor, gate metric names, tuning ranges."""
    problems: list[str] = []
    model = document.get("model")
    if param_checker is not None and isinstance(model, dict) and isinstance(model.get("architecture"), str):
        params = model.get("params") or {}
        if isinstance(params, dict):
            for key, message in param_checker(model["architecture"], dict(params)):
                path = "model.architecture" if key == "architecture" else f"model.params.{key}"
                problems.append(f"{path}: {message}")
    evaluation = document.get("evaluation") or {}
    custom = evaluation.get("custom_metrics") if isinstance(evaluation, dict) else None
    task: Task = "regression" if document.get("task") == "regression" else "classification"
    known = set(task_metrics(task)) | {
        str(path).rpartition(":")[2] for path in (custom if isinstance(custom, list) else [])
    }
    gates = document.get("gates")
    for section in ("min", "max", "vs_champion"):
        entries = gates.get(section) if isinstance(gates, dict) else None
        for metric in entries if isinstance(entries, dict) else {}:
            problem = metric_problem(task, str(metric), known)
            if problem is not None:
                problems.append(f"gates.{section}.{metric}: {problem}")
    return problems + tuning_problems(document, param_checker)


def _kind(value: Any) -> str:
    return "an empty document" if value is None else f"a {type(value).__name__}"


def _describe(error: ValidationError) -> list[str]:
    lines = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        path = ".".join(loc) or "(top level)"
        kind = item["type"]
        if kind == "extra_forbidden":
            allowed = _allowed_keys(PipelineSpec, loc[:-1])
            close = difflib.get_close_matches(loc[-1], allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            lines.append(f"{path}: unknown key{hint}")
            continue
        if kind == "missing":
            lines.append(f"{path}: required key is missing")
            continue
        message = item["msg"].removeprefix("Value error, ")
        if not loc:  # a cross-section check: each line already names its key
            lines += message.splitlines()
            continue
        got = "" if kind.startswith("value_error") or "input" not in item else f" (got {item['input']!r})"
        lines.append(f"{path}: {_plain(message)}{got}")
    return lines


def _plain(message: str) -> str:
    """Pydantic's wording, made to read like CONTRACT's examples ('must be > 0')."""
    replacements = {
        "Input should be greater than or equal to ": "must be >= ",
        "Input should be greater than ": "must be > ",
        "Input should be less than or equal to ": "must be <= ",
        "Input should be less than ": "must be < ",
        "Input should be ": "must be ",
    }
    for old, new in replacements.items():
        if message.startswith(old):
            return new + message[len(old) :]
    return message


def _allowed_keys(model: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names of the model found by walking `loc` from the root spec (for suggestions)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(part)
        if field is None:
            return []
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [field.alias or name for name, field in current.model_fields.items()]
    return []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
