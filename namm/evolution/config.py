"""An evolution run as one TOML file, mapped 1:1 onto dataclasses.

Top-level keys are :class:`RunConfig` fields; each table is one nested dataclass::

    model = "smollm2"            # as for namm.models.load_model (dtype, device, threads optional)
    seed = 0                     # prompts and CMA-ES sampling
    backend = "local"            # or "ray", or "processes" (local worker processes, e.g. on one GPU)
    output_dir = "runs/passkey"
    eval_interval = 5            # evaluate the CMA mean every N generations (0: never)
    chat = false                 # prompts wrapped in the tokenizer's chat template, or raw
    init = "runs/linear/mean"    # optional: the CMA mean starts at this NAMM (namm.memory.model.lift_params),
                                 # with its frozen normalisation instead of a fresh calibration

    [engine]                     # namm.engine.EngineConfig: the eviction schedule
    chunk_size = 128
    delay = 256

    [namm]                       # namm.memory.NAMMConfig: scorer, features, keep mode
    keep = "budget"              # or "threshold" (emergent size, optional max_cache)
    keep_ratio = 0.25
    features = { extras = ["attn_peak", "attn_entropy", "attn_var"] }  # optional extra inputs

    [optimizer]                  # namm.evolution.optimizer.CMAConfig (seed defaults to the run seed)
    popsize = 8

    [fitness]                    # FitnessConfig
    samples_per_task = 4

    [[tasks]]                    # TaskSpec, one per task
    name = "passkey"
    length = 1024
    weight = 1.0                 # its share of the fitness

    [[stages]]                   # StageConfig: incremental task sets, run in order
    tasks = ["passkey"]
    generations = 10

The NAMM records the conditions it is evolved under (``chat``, the [engine] schedule, the keep
mode of [namm]); its saved folders carry them, and ``namm generate`` / ``namm eval`` run it under
them by default. So they are set once, here: [namm] may not set them itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from namm.evolution.optimizer import CMAConfig
from namm.sequence import EngineConfig

FITNESS_MODES = ("metric", "loglik", "margin")
BACKENDS = ("local", "ray", "processes")
SPLITS = ("train", "test")
# NAMMConfig fields the run sets itself, and where a config file sets them instead
RUN_SETS = {"delay": "[engine] delay", "chunk_size": "[engine] chunk_size",
            "evict_at_prefill_end": "[engine] evict_at_prefill_end",
            "evict_during_prefill": "[engine] evict_during_prefill", "chat": "the top-level chat",
            "evolved_on": "the top-level model"}


@dataclass
class TaskSpec:
    """One task of the run and the pool its prompts are drawn from.

    name:    a task of ``namm.tasks`` (e.g. "passkey"), or "continuation" (the dense objective:
             the likelihood of the next tokens of held-back prose, see namm.tasks.continuation).
    length:  prompt length in tokens (synthetic tasks build prompts of about this length).
    prompts: size of the training pool; every generation draws ``samples`` of them.
    samples: prompts drawn per generation (default: fitness.samples_per_task).
    weight:  the task's weight in the fitness, a weighted mean of the per-task ratios.
    options: extra keyword arguments for the task loader (namm.tasks.load_task).
    """

    name: str
    length: int = 1024
    prompts: int = 64
    samples: int | None = None
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Every [[tasks]] entry needs a name, e.g. name = \"passkey\".")
        if not isinstance(self.length, int) or self.length < 16:
            raise ValueError(f"Task {self.name!r}: length must be an integer >= 16 tokens, got {self.length!r}.")
        if not isinstance(self.prompts, int) or self.prompts < 1:
            raise ValueError(f"Task {self.name!r}: prompts (pool size) must be >= 1, got {self.prompts!r}.")
        if self.samples is not None and (not isinstance(self.samples, int) or self.samples < 1):
            raise ValueError(f"Task {self.name!r}: samples must be an integer >= 1, got {self.samples!r}.")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not self.weight > 0:
            raise ValueError(f"Task {self.name!r}: weight must be a number > 0, got {self.weight!r}.")
        from namm.tasks import TASK_OPTIONS

        unknown = sorted(set(self.options) - set(TASK_OPTIONS))
        if unknown:
            raise ValueError(f"Task {self.name!r}: unknown options {unknown}; known: {list(TASK_OPTIONS)}.")


@dataclass
class StageConfig:
    """One stage of incremental training: its task set and how many generations it runs.

    Each stage continues the previous stage's optimiser state; generation numbers continue too.
    """

    tasks: list[str]
    generations: int
    name: str = ""

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("Every [[stages]] entry needs a non-empty tasks list.")
        if not isinstance(self.generations, int) or self.generations < 1:
            raise ValueError(f"Stage {self.tasks}: generations must be an integer >= 1, got {self.generations!r}.")


@dataclass
class FitnessConfig:
    """How a member's fitness is computed (see namm.evolution.fitness).

    mode:                  "metric" (task score / full-cache score, the reference), "loglik"
                           (per-token likelihood of the reference answer relative to the full cache)
                           or "margin" (teacher-forced margins of the answer tokens over the runner-up
                           token: a smooth stand-in for greedy exact match); the continuation task is
                           always scored by likelihood.
    samples_per_task:      prompts per task per generation (the same for every member).
    eval_samples_per_task: prompts per task in the pool the mean is evaluated on.
    eval_split:            the split of that pool: "test" (held-out wordings and filler books) or
                           "train" (same wordings and books, other needles; a continuation prompt may
                           reread a training passage); its seeds never overlap the training pool's.
    kept_penalty:          subtract kept_penalty * mean kept-cache fraction from the fitness
                           (namm.keep = "threshold" only).
    kept_cap:              members keeping more than this fraction rank below every member within it
                           (namm.keep = "threshold" only).
    """

    mode: str = "metric"
    samples_per_task: int = 4
    eval_samples_per_task: int = 16
    eval_split: str = "test"
    kept_penalty: float = 0.0
    kept_cap: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in FITNESS_MODES:
            raise ValueError(f"fitness.mode must be one of {FITNESS_MODES}, got {self.mode!r}.")
        for name in ("samples_per_task", "eval_samples_per_task"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"fitness.{name} must be an integer >= 1, got {getattr(self, name)!r}.")
        if self.eval_split not in SPLITS:
            raise ValueError(f"fitness.eval_split must be one of {SPLITS}, got {self.eval_split!r}.")
        if self.kept_penalty < 0:
            raise ValueError(f"fitness.kept_penalty must be >= 0, got {self.kept_penalty!r}.")
        if self.kept_cap is not None and not 0 < self.kept_cap <= 1:
            raise ValueError(f"fitness.kept_cap must be a fraction in (0, 1], got {self.kept_cap!r}.")


@dataclass
class CalibrationConfig:
    """Normalisation statistics, computed once with the full cache as the first step of stage 1.

    task:    the task whose prompts are read (default: the first task of stage 1).
    samples: how many prompts of its pool to read.
    """

    task: str = ""
    samples: int = 8


@dataclass
class RayConfig:
    """The ray backend: one actor per model replica.

    address: "" starts a local Ray instance; "auto" or "ray://..." joins a cluster.
    actors:  number of model replicas (on a GPU cluster: one per GPU).
    cpus_per_actor / gpus_per_actor: resources each actor reserves.
    max_retries: how many times a member whose actor died is re-run elsewhere.
    worker_niceness: how much nicer than this process the workers of a local Ray instance this
             run starts are (``RAY_worker_niceness``, added to the process's own niceness). Ray's
             own default is 15: its workers then yield to every other process, and on 2 shared
             cores a run beside a test suite went from ~100 s to ~230 s per generation. 0 (the
             default) gives the actors the same share as the process that started them, so
             ``nice namm evolve ...`` still works; None leaves Ray's default. Not used when joining a
             cluster (``address``), when Ray is already initialised, or when the environment
             sets ``RAY_worker_niceness`` itself.
    """

    address: str = ""
    actors: int = 2
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    max_retries: int = 3
    worker_niceness: int | None = 0

    def __post_init__(self) -> None:
        n = self.worker_niceness
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not -20 <= n <= 19):
            raise ValueError(f"ray.worker_niceness must be an integer in [-20, 19] (Unix niceness) or absent, "
                             f"got {n!r}.")


@dataclass
class ProcessesConfig:
    """The processes backend: worker processes on this machine, one model each, no Ray needed.

    workers:     number of processes (each loads the model). On a GPU a ~100M-parameter model
                 leaves the card mostly idle while Python launches its kernels, so several
                 processes can share one card; on a CPU give each one core (``threads = 1``).
    max_retries: how many times the jobs of a worker that died are re-run on a fresh pool.
    """

    workers: int = 2
    max_retries: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"processes.workers must be a positive integer, got {self.workers!r}.")


@dataclass
class RunConfig:
    """Everything an evolution run depends on; saved into the run folder."""

    model: str = "smollm2"
    tasks: list[TaskSpec] = field(default_factory=list)
    stages: list[StageConfig] = field(default_factory=list)
    dtype: str | None = None
    device: str | None = None
    threads: int | None = None
    seed: int = 0
    backend: str = "local"
    output_dir: str = "runs/evolve"
    eval_interval: int = 5
    chat: bool = False
    engine: EngineConfig = field(default_factory=EngineConfig)
    namm: dict[str, Any] = field(default_factory=dict)
    optimizer: CMAConfig = field(default_factory=CMAConfig)
    fitness: FitnessConfig = field(default_factory=FitnessConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    processes: ProcessesConfig = field(default_factory=ProcessesConfig)
    init: str | None = None

    def __post_init__(self) -> None:
        if self.init is not None and (not isinstance(self.init, str) or not self.init):
            raise ValueError(f"init must be the path of a NAMM folder to start from, got {self.init!r}.")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}.")
        if not self.tasks:
            raise ValueError("The run has no tasks: add at least one [[tasks]] table.")
        if not self.stages:
            raise ValueError("The run has no stages: add at least one [[stages]] table.")
        from namm.tasks import resolve_task

        names = [t.name for t in self.tasks]
        for name in names:
            resolve_task(name)  # an unknown task fails here, before any model is loaded
        if len(set(names)) != len(names):
            raise ValueError(f"Task names must be unique, got {names}.")
        for stage in self.stages:
            unknown = [t for t in stage.tasks if t not in names]
            if unknown:
                raise ValueError(f"Stage tasks {unknown} are not defined in [[tasks]] (defined: {names}).")
        if not self.calibration.task:
            self.calibration.task = self.stages[0].tasks[0]
        elif self.calibration.task not in names:
            raise ValueError(f"calibration.task {self.calibration.task!r} is not one of the [[tasks]] {names}.")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer (torch CPU threads per worker), got {self.threads!r}.")
        if not isinstance(self.eval_interval, int) or self.eval_interval < 0:
            raise ValueError(f"eval_interval must be an integer >= 0, got {self.eval_interval!r}.")
        if not isinstance(self.chat, bool):
            raise ValueError(f"chat must be true or false, got {self.chat!r}.")
        self._check_namm()

    def _check_namm(self) -> None:
        """[namm] builds a NAMMConfig, leaves the run's conditions to the run, and fits [fitness]."""
        from namm.memory.model import NAMMConfig

        owned = sorted(set(self.namm) & set(RUN_SETS))
        if owned:
            where = "; ".join(f"{k}: set {RUN_SETS[k]}" for k in owned)
            raise ValueError(f"[namm] cannot set {owned}: the NAMM records the run's own values ({where}).")
        try:
            config = NAMMConfig.from_dict(self.namm_config())
        except (TypeError, ValueError) as exc:
            raise ValueError(f"[namm]: {exc}") from exc
        if config.keep == "budget":
            for key in ("kept_penalty", "kept_cap"):
                if getattr(self.fitness, key):
                    raise ValueError(f"fitness.{key} has no effect with [namm] keep = \"budget\" (every member keeps "
                                     "the same cache); remove it, or use keep = \"threshold\".")

    def namm_config(self) -> dict[str, Any]:
        """The NAMM's config as a dict: the [namm] table plus the conditions the run evolves it under."""
        from namm.memory.model import schedule_of

        return {**self.namm, **schedule_of(self.engine), "chat": self.chat, "evolved_on": self.model}

    def samples(self, task: str) -> int:
        """Prompts of ``task`` each generation draws."""
        spec = self.task(task)
        return spec.samples if spec.samples is not None else self.fitness.samples_per_task

    def task(self, name: str) -> TaskSpec:
        return next(t for t in self.tasks if t.name == name)

    @property
    def total_generations(self) -> int:
        return sum(s.generations for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """Build from the parsed TOML; unknown keys raise an error that names the table."""
        data = dict(data)
        _check_keys(cls, data, "the top level")
        optimizer = dict(data.get("optimizer") or {})
        optimizer.setdefault("seed", int(data.get("seed", 0)))  # one seed drives the run
        data["optimizer"] = optimizer
        nested = {"engine": EngineConfig, "optimizer": CMAConfig, "fitness": FitnessConfig,
                  "calibration": CalibrationConfig, "ray": RayConfig, "processes": ProcessesConfig}
        for key, kind in nested.items():
            if key in data:
                table = data[key] if data[key] is not None else {}
                _check_keys(kind, table, f"[{key}]")
                data[key] = kind(**table)
        for key, kind in (("tasks", TaskSpec), ("stages", StageConfig)):
            items = []
            for item in data.get(key, []):
                _check_keys(kind, item, f"[[{key}]]")
                items.append(kind(**item))
            data[key] = items
        return cls(**data)


def _check_keys(kind: type, table: Any, where: str) -> None:
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table, got {type(table).__name__}.")
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in {where} of the run config; known: {sorted(known)}.")


def load_config(path: str | Path, output_dir: str | Path | None = None) -> RunConfig:
    """Read a run's TOML file; ``output_dir`` overrides the file's ``output_dir``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Run config {str(path)!r} not found; see examples/smollm2-default.toml.")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from exc
    if output_dir is not None:
        data["output_dir"] = str(output_dir)
    return RunConfig.from_dict(data)
