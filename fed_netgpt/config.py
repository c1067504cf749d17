"""One typed configuration for every command and both Flower apps.

Merge order: dataclass defaults -> conf/base.yaml -> optional preset (conf/<preset>.yaml or a file) ->
overrides (`key=value` from the command line, or Flower's run_config). Unknown keys and wrong types
fail with a `ConfigError` that names the key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m"  # smollm2-135m | tiny-random | a local Hugging Face model folder
    cache_dir: str = ""  # where the converted SmolLM2 lives; "" -> $FED_NETGPT_CACHE or ~/.cache/fed-netgpt


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # a prompt-pair JSONL to use instead of building one
    region_by: str = "country"  # country | continent | list
    countries: list[str] = field(default_factory=lambda: ["FR", "JP", "BR"])
    continents: list[str] = field(default_factory=lambda: ["EU", "AS", "SA"])
    num_regions: int = 0  # > 0: the countries (continents) with the most cities, instead of the lists above
    regions: dict[str, list[str]] = field(default_factory=dict)  # region_by=list: region -> city names
    context: str = "none"  # none | city | coordinates: what the edge tells its model about where it is
    sites_per_region: int = 3  # sites that train (Flower nodes)
    num_sites: int = 0  # > 0: training sites over all regions, spread evenly; replaces sites_per_region
    heldout_sites_per_region: int = 1  # more sites that never train: cold start with the region's adapter
    min_population: int = 100_000
    max_pairs_per_site: int = 32  # training pairs of a region's biggest site
    min_pairs_per_site: int = 4  # ... and of its smallest: sizes fall as rank^-size_skew in between
    size_skew: float = 1.5
    valid_pairs_per_site: int = 2  # pairs of training intents kept for per-round validation
    test_intents: list[str] = field(default_factory=lambda: ["taxi", "pharmacy", "museum"])
    test_fraction: float = 0.2  # for user JSONL lines without "split"
    valid_fraction: float = 0.1  # of the other lines without "split"
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = 6
    batch_size: int = 4
    learning_rate: float = 4e-3
    weight_decay: float = 0.0
    max_length: int = 128
    proximal_mu: float = 0.0  # FedProx term weight; 0 disables it
    bf16: str = "auto"  # auto | true | false: bf16 autocast only where it is faster (fed_netgpt/model/precision.py)
    device: str = "auto"  # auto (cuda where the process sees a GPU) | cpu | cuda
    sites_per_pass: int = 1  # a node's sites trained in one grouped forward/backward (grouped_lora.py); 1: in turn
    fused_kernels: bool = True  # on a GPU, grouped passes use torch's fused RMSNorm and compiled MLPs (fused.py)
    # grouped: every training is a grouped pass of K >= 1 sites (training/engine.py) | peft: peft's one-adapter
    # loop, the reference engine the equivalence tests hold the grouped pass to (training/reference.py)
    engine: str = "grouped"
    seed: int = 0


@dataclass(frozen=True)
class FederationConfig:
    num_rounds: int = 3
    strategy: str = "fedavg"  # fedavg | fedprox | fedadam | fedyogi | fedavgm
    adapters: str = "regional"  # regional: one per region | global: one for all sites | local: each site alone
    lora_aggregation: str = "factors"  # factors: A and B averaged apart | ffa: A frozen | svd: mean of B·A, rank r
    fraction_train: float = 1.0
    wire_dtype: str = "float32"  # float32 | float16: adapters on the wire both ways (NumPy has no bfloat16)
    fraction_evaluate: float = 1.0
    server_learning_rate: float = 1.0  # fedavgm
    server_momentum: float = 0.9  # fedavgm
    eta: float = 0.01  # fedadam/fedyogi server learning rate (Flower's name)
    tau: float = 0.001  # fedadam/fedyogi adaptivity
    min_nodes: int = 0  # nodes to wait for before round 1; 0 -> until the nodes serve every training site
    min_replies: int = 1  # valid replies a region needs in a round to update its adapter (else it keeps it)
    max_update_norm: float = math.inf  # a site's update (L2 over all its arrays) above this is rejected; inf: off
    robust: str = "none"  # none | median | trimmed_mean | clipped_mean | krum: each region's mean made robust
    robust_fraction: float = 0.2  # share of a region's replies assumed malicious: trimmed at each end, Krum's f
    timeout: float = 3600.0
    # before round 1: how long the nodes, still starting (a cold one imports torch and loads the model), have to
    # say which sites they serve; a limit of its own, apart from a round's timeout
    discovery_timeout: float = 300.0


@dataclass(frozen=True)
class PersonalizationConfig:
    method: str = "ditto"  # ditto: a site adapter pulled toward its region's | none
    steps: int = 4  # local steps of the site adapter per round
    ditto_lambda: float = 0.1  # weight of (lambda/2)·||site adapter - regional adapter||²


@dataclass(frozen=True)
class PrivacyConfig:
    # none | sample_dp: DP-SGD at each site, one prompt pair the privacy unit (fed_netgpt/training/privacy.py)
    # | client_dp: each site's update clipped, the region's mean noised, a site's whole data the unit
    mode: str = "none"
    target_epsilon: float = math.inf  # inf: no target (then noise_multiplier is given)
    delta: float = 1e-5
    noise_multiplier: float = 0.0  # 0: not set, derived from target_epsilon over every planned step of the run
    max_grad_norm: float = 1.0  # L2 clipping: sample_dp each pair's gradient, client_dp each site's update
    # sample_dp's per-pair gradients: grouped (the grouped LoRA layer keeps them; Opacus's clipping, noise and
    # accountant, tested equal to its DPOptimizer) | opacus (Opacus's GradSampleModule hooks and DPOptimizer)
    engine: str = "grouped"
    # true: each site's Poisson draws and noise are seeded from train.seed, its id and its step count, so a run is
    # the same however its sites are packed; whoever knows the seed can regenerate the noise (experiments only)
    reproducible: bool = False


@dataclass(frozen=True)
class CompareConfig:
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    seeds: int = 1  # repeat every trained variant with run.seed = train.seed = 0 .. seeds-1
    # the privacy-utility variants (local_dp, regional_dp, ...) train once per epsilon; inf: without DP
    epsilons: list[float] = field(default_factory=lambda: [math.inf, 8.0, 4.0, 1.0])


@dataclass(frozen=True)
class EvaluationConfig:
    max_new_tokens: int = 48
    max_examples_per_region: int = 9
    batch_size: int = 16
    examples_to_show: int = 1
    # auto | true | false: the final report from the sites' own scoring of their own test rows (federated),
    # or from the server's copy of the data. auto: federated as soon as one node keeps its own data (deployment)
    federated: str = "auto"


@dataclass(frozen=True)
class SimulationConfig:
    num_cpus_per_client: float = 2.0  # Ray resources per ClientApp; a whole machine by default
    num_gpus_per_client: float = 0.0  # GPU share per ClientApp (0.25: four sites' work on one GPU); 0 with a GPU
    #                                   and train.device auto/cuda: the GPUs split among the clients that run at once
    torch_threads: int = 0  # 0 -> torch's default
    num_supernodes: int = 0  # nodes of `fed-netgpt simulate`; 0: one per training site (sites share nodes if fewer)
    ray_address: str = ""  # "": a Ray of this machine | HOST:6379 or auto: a running Ray cluster (several machines)


@dataclass(frozen=True)
class FaultsConfig:
    """Faults injected into a simulation (fed_netgpt/run/faults.py)."""

    crash_probability: float = 0.0  # each site, each round: its training crashes with this probability
    slow_probability: float = 0.0  # each site, each round: it stalls `slow_seconds` before training
    slow_seconds: float = 0.0  # how long a slow site stalls (beyond federation.timeout: its reply comes too late)
    poison_fraction: float = 0.0  # sites of each region (rounded to the nearest, halves up) that send poisoned updates
    poison_kind: str = "sign_flip"  # scale | sign_flip | random (fed_netgpt/run/faults.py:poison_update)
    poison_scale: float = 10.0  # how far a poisoned update goes, in multiples of the site's real update


@dataclass(frozen=True)
class ServingConfig:
    """`fed-netgpt serve` and `complete`: edge decoding, request batching and limits, the cloud."""

    max_new_tokens: int = 48  # tokens the edge may add to complete a prompt
    precision: str = "auto"  # auto | fp32 | int8: int8 weights of the frozen base (CPU), LoRA factors stay fp32
    max_batch: int = 16  # requests decoded together
    draft_tokens: int = 8  # a greedy request checks up to this many prompt-lookup tokens a pass (0: one token a pass)
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_prompt_tokens: int = 256  # longer prompts are refused (413), never cut
    max_body_bytes: int = 65536  # HTTP bodies above this are refused (413)
    reload_seconds: float = 2.0  # how often the run folder is checked for newer adapters
    cloud: str = "smollm2-135m"  # the local cloud model when no cloud_url: smollm2-135m | tiny-random | a folder
    cloud_url: str = ""  # an OpenAI-compatible endpoint (http://host:port/v1): the cloud instead of a local model
    cloud_model: str = ""  # "": the first model the cloud lists at GET /v1/models
    cloud_max_tokens: int = 128  # tokens of the cloud's answer
    cloud_timeout: float = 60.0  # seconds per cloud request
    cloud_retries: int = 2  # retries of a failed cloud request (connection errors, 429, 5xx)
    log_prompts: bool = False  # prompts and completions in the service log


@dataclass(frozen=True)
class RunSettings:
    output_dir: str = "runs/latest"
    seed: int = 0
    resume: bool = False  # continue from the latest checkpoints/round-<n> in output_dir
    report: bool = True  # evaluate and write the personalization report at the end (compare does it itself)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    personalization: PersonalizationConfig = field(default_factory=PersonalizationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    run: RunSettings = field(default_factory=RunSettings)
    preset: str = ""  # name of conf/<preset>.yaml or a YAML path, applied after base.yaml

    def __post_init__(self) -> None:
        _check_choice("federation.strategy", self.federation.strategy, STRATEGIES)
        _check_choice("federation.adapters", self.federation.adapters, ("regional", "global", "local"))
        _check_choice("federation.lora_aggregation", self.federation.lora_aggregation, ("factors", "ffa", "svd"))
        _check_choice("federation.wire_dtype", self.federation.wire_dtype, ("float32", "float16"))
        _check_choice("federation.robust", self.federation.robust, ROBUST)
        _check_choice("faults.poison_kind", self.faults.poison_kind, POISON_KINDS)
        _check_choice("data.region_by", self.data.region_by, ("country", "continent", "list"))
        _check_choice("data.context", self.data.context, CONTEXTS)
        _check_choice("train.bf16", str(self.train.bf16).lower(), ("auto", "true", "false"))
        _check_choice("train.device", self.train.device, ("auto", "cpu", "cuda"))
        _check_choice("train.engine", self.train.engine, ("grouped", "peft"))
        object.__setattr__(self.train, "bf16", str(self.train.bf16).lower())  # YAML's true arrives as "True"
        _check_choice("evaluation.federated", str(self.evaluation.federated).lower(), ("auto", "true", "false"))
        object.__setattr__(self.evaluation, "federated", str(self.evaluation.federated).lower())
        _check_choice("personalization.method", self.personalization.method, ("ditto", "none"))
        _check_choice("serving.precision", self.serving.precision, ("auto", "fp32", "int8"))
        _check_compare(self.compare, self.privacy)
        for key, value in _positive_fields(self).items():
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{key} must be a finite number > 0, got {value}")
        if not 0.0 <= self.lora.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be within [0, 1), got {self.lora.dropout}")
        if self.federation.min_replies < 1:
            raise ConfigError(f"federation.min_replies must be >= 1, got {self.federation.min_replies}")
        if not self.federation.max_update_norm > 0:
            raise ConfigError(f"federation.max_update_norm must be > 0 (inf: no bound), got "
                              f"{self.federation.max_update_norm}")
        if not 0.0 < self.federation.fraction_train <= 1.0:
            raise ConfigError(f"federation.fraction_train must be within (0, 1] (0 trains no site), got "
                              f"{self.federation.fraction_train}")
        if not 0.0 <= self.federation.robust_fraction < 0.5:
            raise ConfigError(f"federation.robust_fraction must be within [0, 0.5) (a majority must be honest), got "
                              f"{self.federation.robust_fraction}")
        if not 0.0 <= self.federation.server_momentum < 1.0:
            raise ConfigError(f"federation.server_momentum must be within [0, 1), got "
                              f"{self.federation.server_momentum}")
        if not 0.0 <= self.faults.poison_fraction < 1.0:
            raise ConfigError(f"faults.poison_fraction must be within [0, 1), got {self.faults.poison_fraction}")
        for key in ("federation.fraction_evaluate", "data.test_fraction", "data.valid_fraction",
                    "faults.crash_probability", "faults.slow_probability"):
            value = select(self, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key} must be within [0, 1], got {value}")
        if self.data.min_pairs_per_site > self.data.max_pairs_per_site:
            raise ConfigError(f"data.min_pairs_per_site ({self.data.min_pairs_per_site}) must be <= "
                              f"data.max_pairs_per_site ({self.data.max_pairs_per_site})")
        for key in ("data.heldout_sites_per_region", "data.num_sites", "data.num_regions", "data.valid_pairs_per_site",
                    "data.size_skew", "personalization.ditto_lambda", "simulation.num_gpus_per_client",
                    "simulation.num_supernodes", "serving.max_wait_ms", "serving.cloud_retries", "serving.draft_tokens",
                    "federation.min_nodes", "evaluation.examples_to_show", "train.weight_decay", "train.proximal_mu",
                    "faults.slow_seconds"):
            if not select(self, key) >= 0:
                raise ConfigError(f"{key} must be >= 0, got {select(self, key)}")
        if self.data.region_by == "list" and not self.data.regions and not self.data.path:
            raise ConfigError("data.regions must name at least one region when data.region_by=list")
        _check_privacy(self.privacy)
        _check_combinations(self)


def _check_privacy(privacy: PrivacyConfig) -> None:
    """Ranges, and exactly one way to set the noise: a given noise_multiplier, or a target_epsilon to derive it."""
    _check_choice("privacy.mode", privacy.mode, ("none", "sample_dp", "client_dp"))
    _check_choice("privacy.engine", privacy.engine, ("grouped", "opacus"))
    if not 0.0 < privacy.delta < 1.0:
        raise ConfigError(f"privacy.delta must be within (0, 1), got {privacy.delta}")
    if not privacy.target_epsilon > 0:
        raise ConfigError(f"privacy.target_epsilon must be > 0 (inf: no target), got {privacy.target_epsilon}")
    if not (privacy.noise_multiplier >= 0 and math.isfinite(privacy.noise_multiplier)):
        raise ConfigError(f"privacy.noise_multiplier must be >= 0 (0: derived from privacy.target_epsilon), "
                          f"got {privacy.noise_multiplier}")
    if not (privacy.max_grad_norm > 0 and math.isfinite(privacy.max_grad_norm)):
        raise ConfigError(f"privacy.max_grad_norm must be > 0, got {privacy.max_grad_norm}")
    if privacy.mode == "none":
        return
    given, targeted = privacy.noise_multiplier > 0, math.isfinite(privacy.target_epsilon)
    if given == targeted:
        raise ConfigError(
            f"privacy.mode={privacy.mode} needs exactly one of privacy.noise_multiplier (> 0) and "
            f"privacy.target_epsilon (finite); got noise_multiplier={privacy.noise_multiplier}, "
            f"target_epsilon={privacy.target_epsilon}" + (" (set the other to 0 / inf)" if given else ""))


def _check_combinations(config: Config) -> None:
    """Options that each work alone but not together: strategy x LoRA aggregation x privacy."""
    federation, privacy = config.federation, config.privacy
    averaging = federation.strategy in ("fedavg", "fedprox")
    if federation.strategy == "fedprox" and config.train.proximal_mu <= 0:
        raise ConfigError("federation.strategy=fedprox needs train.proximal_mu > 0")
    if federation.lora_aggregation == "svd" and not averaging:
        raise ConfigError("federation.lora_aggregation=svd averages the products B·A itself: it works with "
                          f"federation.strategy fedavg or fedprox, not {federation.strategy}")
    if federation.robust != "none":
        _check_robust(config)
    if config.train.sites_per_pass > 1 and privacy.mode == "client_dp":
        raise ConfigError(f"train.sites_per_pass={config.train.sites_per_pass} packs several sites' updates in one "
                          "reply, and client_dp clips each site's update on its own reply; privacy.mode=client_dp "
                          "needs train.sites_per_pass=1")
    if config.train.sites_per_pass > 1 and privacy.mode == "sample_dp" and privacy.engine == "opacus":
        raise ConfigError(f"train.sites_per_pass={config.train.sites_per_pass} trains several sites in one grouped "
                          "pass, which Opacus's hooks cannot reach (its per-pair gradients come from the grouped "
                          "layer); privacy.engine=opacus needs train.sites_per_pass=1")
    if privacy.mode != "client_dp":
        return
    if not averaging:
        raise ConfigError("privacy.mode=client_dp calibrates its noise to a plain mean of clipped updates: it "
                          f"works with federation.strategy fedavg or fedprox, not {federation.strategy}")
    if federation.lora_aggregation == "svd":
        raise ConfigError("privacy.mode=client_dp noises the mean of the sites' A and B; "
                          "federation.lora_aggregation=svd would replace it by an SVD of the raw updates: use "
                          "factors or ffa")
    if federation.wire_dtype != "float32":
        raise ConfigError("privacy.mode=client_dp clips each site's update on the arrays it sends; use "
                          f"federation.wire_dtype=float32, not {federation.wire_dtype}")
    if federation.adapters == "local":
        raise ConfigError("privacy.mode=client_dp protects what the federation averages; federation.adapters=local "
                          "averages nothing (use privacy.mode=sample_dp to protect each site's own training)")


def _check_robust(config: Config) -> None:
    """A robust aggregator replaces the region's mean; what would be applied on top of that mean would undo it."""
    federation, robust = config.federation, f"federation.robust={config.federation.robust}"
    if federation.strategy not in ("fedavg", "fedprox"):
        raise ConfigError(f"{robust} replaces the mean of the updates; federation.strategy={federation.strategy} "
                          "would feed it to a server optimizer whose momentum carries a poisoned round on: use fedavg "
                          "or fedprox")
    if config.privacy.mode == "client_dp":
        raise ConfigError(f"{robust}: privacy.mode=client_dp sizes its noise for a plain mean of clipped updates; "
                          "use federation.robust=none with it")
    if federation.lora_aggregation == "svd":
        raise ConfigError(f"{robust}: federation.lora_aggregation=svd replaces the aggregate by the mean of every "
                          "reply's B·A; use factors or ffa")


def _check_compare(compare: CompareConfig, privacy: PrivacyConfig) -> None:
    for variant in compare.variants:
        _check_choice("compare.variants", variant, VARIANTS)
    for epsilon in compare.epsilons:
        if not (isinstance(epsilon, (int, float)) and epsilon > 0):
            raise ConfigError(f"compare.epsilons must be > 0 (inf: without DP), got {epsilon!r}")
    if len(set(compare.epsilons)) != len(compare.epsilons):
        raise ConfigError(f"compare.epsilons names an epsilon twice: {compare.epsilons}")
    dp_variants = [v for v in compare.variants if v.endswith("_dp")]
    if dp_variants and privacy.mode != "none":
        raise ConfigError(f"compare.variants {', '.join(dp_variants)} set the privacy of their runs from "
                          f"compare.epsilons; leave privacy.mode=none (got {privacy.mode})")


POISON_KINDS = ("scale", "sign_flip", "random")  # fed_netgpt/run/faults.py:poison_update says what each sends
ROBUST = ("none", "median", "trimmed_mean", "clipped_mean", "krum")  # strategies/robust.py says what each does
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm")
CONTEXTS = ("none", "city", "coordinates")
# What `fed-netgpt compare` can train and evaluate side by side (fed_netgpt/evaluation/comparison.py says what each is).
DEFAULT_VARIANTS: tuple[str, ...] = ("base", "local", "global", "global_city", "regional", "personalized",
                                     "regional_ffa", "regional_svd")
VARIANTS = (*DEFAULT_VARIANTS, "local_dp", "regional_dp", "personalized_dp", "regional_ffa_dp")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def _positive_fields(config: Config) -> dict[str, float]:
    keys = (
        "lora.r", "lora.alpha", "data.sites_per_region", "data.max_pairs_per_site", "data.min_pairs_per_site",
        "personalization.steps", "compare.seeds", "train.local_steps", "train.sites_per_pass", "train.batch_size",
        "train.learning_rate", "train.max_length", "federation.num_rounds", "evaluation.max_new_tokens",
        "evaluation.max_examples_per_region", "evaluation.batch_size", "serving.max_new_tokens", "serving.max_batch",
        "serving.max_prompt_tokens", "serving.max_body_bytes", "serving.reload_seconds", "serving.cloud_max_tokens",
        "serving.cloud_timeout", "federation.timeout", "federation.discovery_timeout", "simulation.num_cpus_per_client",
        "faults.poison_scale", "federation.eta", "federation.tau", "federation.server_learning_rate",
    )
    return {key: select(config, key) for key in keys}


def select(config: Any, dotted_key: str) -> Any:
    """`select(cfg, "train.batch_size")` -> cfg.train.batch_size."""
    value = config
    for part in dotted_key.split("."):
        value = getattr(value, part)
    return value


def load_config(
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | list[str] | None = None,
) -> Config:
    """Build the typed config: defaults -> base.yaml -> preset -> config_file -> overrides."""
    try:
        merged = OmegaConf.structured(Config)
        merged = OmegaConf.merge(merged, _load_yaml(CONF_DIR / "base.yaml"))
        override_conf = _checked_sections(_overrides_to_conf(overrides), "override")
        file_conf = _checked_sections(_load_yaml(Path(config_file)), str(config_file)) if config_file \
            else OmegaConf.create({})
        preset = override_conf.get("preset") or file_conf.get("preset") or merged.preset
        if preset:
            merged = OmegaConf.merge(merged, _load_yaml(_preset_path(str(preset))))
        merged = OmegaConf.merge(merged, file_conf, override_conf)
        return _to_config(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # OmegaConf's merge of a mapping into a list (or back) raises these
        given = list(overrides or [])
        raise ConfigError(f"a value does not fit the type of its key ({err}); check "
                          f"{', '.join(map(str, given)) or config_file}") from None


SECTIONS = {f.name for f in dataclasses.fields(Config)} - {"preset"}


def _checked_sections(conf: Any, origin: str) -> Any:
    """A config layer must be a mapping whose sections (model, train, ...) are mappings: a YAML list, or
    `federation=5`, is named here rather than deep inside OmegaConf's merge."""
    if not OmegaConf.is_dict(conf):
        raise ConfigError(f"{origin}: a config must be a mapping of sections (model:, train:, ...), "
                          f"got a {type(OmegaConf.to_container(conf)).__name__}")
    for key in conf:
        if key in SECTIONS and not OmegaConf.is_dict(conf[key]):
            raise ConfigError(f"{origin}: config key {key} is a section; set its keys (e.g. {key}.<key>=...), "
                              f"not {conf[key]!r}")
    return conf


def _load_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return OmegaConf.load(path)
    except Exception as err:  # yaml errors come in several types
        raise ConfigError(f"{path}: not valid YAML ({err})") from None


def _preset_path(preset: str) -> Path:
    candidate = Path(preset)
    if candidate.suffix in (".yaml", ".yml"):
        return candidate
    path = CONF_DIR / f"{preset}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONF_DIR.glob("*.yaml") if p.stem != "base")
        raise ConfigError(f"preset: no preset named {preset!r}; known presets: {', '.join(known)}")
    return path


def _overrides_to_conf(overrides: Mapping[str, Any] | list[str] | None) -> Any:
    if not overrides:
        return OmegaConf.create({})
    if isinstance(overrides, list):
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            try:
                OmegaConf.from_dotlist([item])
            except Exception as err:  # yaml's scanner errors are not OmegaConf's
                raise ConfigError(f"override {item!r}: the value is not valid YAML ({type(err).__name__})") from None
        return OmegaConf.from_dotlist(overrides)
    conf = OmegaConf.create({})
    for key, value in overrides.items():
        OmegaConf.update(conf, key, value, force_add=True)
    return conf


def _to_config(merged: Any) -> Config:
    """The `Config` a merge onto `OmegaConf.structured(Config)` builds (omegaconf types it as any container)."""
    config = OmegaConf.to_object(merged)
    if not isinstance(config, Config):
        raise TypeError(f"expected the merged config to build a Config, got a {type(config).__name__}")
    return config


def _explain(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    message = str(err).splitlines()[0]
    if "not in struct" in message or "Key '" in message and "not" in message:
        return f"unknown config key: {key or message}"
    return f"config key {key}: {message}" if key else message


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def from_yaml(text: str) -> Config:
    """Rebuild a config saved with `to_yaml` (a run folder's config.yaml, a server message)."""
    try:
        saved = OmegaConf.create(text)
    except Exception as err:  # yaml's scanner and parser errors are not OmegaConf's
        raise ConfigError(f"not valid YAML ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), _checked_sections(saved, "the saved config"))
        return _to_config(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None


def scalar_defaults(config: Config) -> dict[str, Any]:
    """Flat `{dotted.key: value}` of every scalar setting: what Flower's run_config can carry."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(key + ".", value)
            elif isinstance(value, (str, int, float, bool)):
                flat[key] = value

    walk("", config)
    return flat


def overrides_from_run_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Keys of Flower's run_config that differ from base.yaml.

    pyproject.toml must list every overridable key with its base.yaml value (a test keeps them equal),
    so only the keys a user changed with `--run-config` come through; a preset then still applies.
    """
    defaults = scalar_defaults(load_config())
    return {k: v for k, v in run_config.items() if k not in defaults or defaults[k] != v}
