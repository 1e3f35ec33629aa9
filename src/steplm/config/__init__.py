"""The run configuration: the schema (one dataclass per concern, no torch), loading from YAML and
``--set`` overrides, and validation that names the key to change."""
from steplm.config.load import from_dict, load, load_saved, override_key, save  # noqa: F401
from steplm.config.schema import (SECTIONS, ApolloConfig, DataConfig, GaloreConfig, LoraConfig, ModelConfig,  # noqa: F401
                                  RunConfig, SFTConfig, StepConfig, TrainConfig, dotted_fields, field_docs)
from steplm.config.validate import (RESUME_SAFE_KEYS, differing_keys, problems, unread_keys,  # noqa: F401
                                     validate)
