"""Typed configuration: dataclass schema + YAML/CLI loader."""

from uniperceiver.config.loader import (  # noqa: F401 -- re-exports
    ConfigError,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_config,
    load_yaml,
    parse_cli,
    to_dict,
)

from uniperceiver.config.model import (  # noqa: F401 -- re-exports
    TEMPERATURE_NAMES,
    ModelConfig,
    ModelMoEConfig,
    PromptConfig,
    RELEASE_PROMPT_TRAINABLE,
)
from uniperceiver.config.schema import (  # noqa: F401 -- re-exports
    DataSourceConfig,
    EvalConfig,
    OptimConfig,
    RunConfig,
    TargetSetConfig,
    TaskConfig,
    TrainConfig,
    resolve_path,
)
