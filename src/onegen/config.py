"""Typed training configuration: the only schema for YAML files, CLI overrides and saved runs.

`TrainConfig.from_yaml(path)` reads a YAML file (with `--section.key value` overrides), `from_dict` builds
from nested dicts, `to_dict`/`save` write the resolved config back. Unknown keys and bad values raise
`OneGenError` saying which key and how to fix it. Reading the file itself (strict YAML, overrides, path
resolution) lives in `onegen.configfile`; this module imports nothing else of onegen but
errors/io/configfile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, get_origin, get_type_hints

import yaml

from .configfile import _resolve_paths, apply_overrides, keys_related, read_yaml
from .errors import OneGenError
from .io import write_text_atomic


@dataclass
class ScratchConfig:
    """A new model built from an architecture name (no pretrained weights)."""

    architecture: str = "llama"  # any model_type transformers knows
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int | None = None  # default: 4 x hidden (2.75 x for gated MLPs is not guessed)
    max_position_embeddings: int = 2048
    extra: dict[str, Any] = field(default_factory=dict)  # passed to the HF config as is

    def __post_init__(self) -> None:
        for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
            _at_least(f"model.scratch.{key}", getattr(self, key), 1)
        if self.hidden_size % self.num_heads and "head_dim" not in self.extra:
            raise OneGenError(f"must be a multiple of model.scratch.num_heads ({self.num_heads})",
                              field="model.scratch.hidden_size")


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # a pretrained causal LM: local dir or hub id
    scratch: ScratchConfig | None = None  # or a new one from an architecture
    trust_remote_code: bool = False  # never on unless asked for explicitly
    gradient_checkpointing: bool = False


@dataclass
class TokenizerTrainConfig:
    vocab_size: int = 4000
    min_frequency: int = 2

    def __post_init__(self) -> None:
        _at_least("tokenizer.train.vocab_size", self.vocab_size, 1)
        _at_least("tokenizer.train.min_frequency", self.min_frequency, 1)


@dataclass
class TokenizerConfig:
    name_or_path: str | None = None  # default: the model's
    train: TokenizerTrainConfig | None = None  # train a BPE tokenizer on the training data + corpus


@dataclass
class TokensConfig:
    """The special token strings and the descriptions their embeddings start from."""

    query: str = "[RQ]"
    doc: str = "[RD]"
    open: str = "<paragraph>"
    close: str = "</paragraph>"
    descriptions: dict[str, str] = field(default_factory=lambda: {
        "query": "retrieve a relevant document for the question",
        "doc": "summary of this document",
        "open": "start of a retrieved paragraph",
        "close": "end of a retrieved paragraph",
    })
    extra: dict[str, str] = field(default_factory=dict)  # extra generation tokens: token -> description

    def strings(self) -> list[str]:
        return [self.query, self.doc, self.open, self.close, *self.extra]

    def description_of(self, token: str) -> str:
        for key in ("query", "doc", "open", "close"):
            if getattr(self, key) == token:
                return self.descriptions.get(key, key)
        return self.extra.get(token, token)

    def __post_init__(self) -> None:
        strings = self.strings()
        if any(not s or not s.strip() for s in strings):
            raise OneGenError("special token strings must be non-empty", field="tokens")
        if len(set(strings)) != len(strings):
            raise OneGenError(f"special token strings must all differ, got {strings}", field="tokens")


@dataclass
class DataConfig:
    train: str | None = None  # required: training samples (JSONL)
    corpus: str | None = None  # required when samples have retrievals
    eval: str | None = None  # optional held-out evaluation items (QA/EL format)
    format: str = "native"  # native | onegen-original
    task: str = "qa"  # qa | el
    max_length: int = 1024
    on_truncation: str = "error"  # error (when a query token would be cut) | shorten (drop cut retrievals) | drop
    doc_max_length: int = 256

    def __post_init__(self) -> None:
        _choice("data.format", self.format, ("native", "onegen-original"))
        _choice("data.task", self.task, ("qa", "el"))
        _choice("data.on_truncation", self.on_truncation, ("shorten", "drop", "error"))
        _at_least("data.max_length", self.max_length, 8)
        _at_least("data.doc_max_length", self.doc_max_length, 4)  # [BOS] + text + [RD]


@dataclass
class LossConfig:
    type: str = "infonce"  # infonce | bpr
    temperature: float = 0.02
    lm_weight: float = 1.0
    retrieval_weight: float = 1.0
    query_token_weight: float = 1.0  # LM loss weight of query-token targets: learning WHEN to retrieve
    negatives: int = 4  # per query: hard negatives from the sample, topped up at random
    in_batch_negatives: bool = True  # other queries' positives count as negatives
    gather_across_ranks: bool = True  # all-gather document vectors (with gradients) under DDP

    def __post_init__(self) -> None:
        _choice("loss.type", self.type, ("infonce", "bpr"))
        _positive("loss.temperature", self.temperature)
        _at_least("loss.negatives", self.negatives, 0)
        _at_least("loss.query_token_weight", self.query_token_weight, 0)
        if self.lm_weight < 0 or self.retrieval_weight < 0 or self.lm_weight + self.retrieval_weight <= 0:
            raise OneGenError("loss.lm_weight and loss.retrieval_weight must be >= 0 and not both 0 "
                              "(0 turns that objective off: generation-only or retrieval-only training)",
                              field="loss")
        if self.retrieval_weight > 0 and self.negatives == 0 and not self.in_batch_negatives:
            raise OneGenError("with loss.negatives 0 and loss.in_batch_negatives false a query has no candidate "
                              "but its positive: the retrieval loss would be 0 and teach nothing; allow "
                              "negatives, or set loss.retrieval_weight 0", field="loss.negatives")


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: Any = "all-linear"  # a list of module names, or "all-linear"

    def __post_init__(self) -> None:
        _at_least("train.lora.r", self.r, 1)
        _positive("train.lora.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise OneGenError(f"must be >= 0 and < 1, got {self.dropout}", field="train.lora.dropout")


@dataclass
class TrainSection:
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 8  # samples per optimizer step per process (before accumulation split)
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size / grad_accum each)
    lr: float = 2.0e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: str = "cosine"  # cosine | linear | constant
    max_grad_norm: float | None = 1.0
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | bf16 | fp16 | no
    lora: LoraConfig | None = None
    save_every: int = 0  # checkpoint every N optimizer steps (0: no checkpoints, the model is saved at the end)
    keep_checkpoints: int = 2  # the newest N checkpoints are kept (0: all)
    log_every: int = 10
    resume: bool = True  # continue from the last complete checkpoint in output_dir
    progress: bool = True
    packing: bool = True  # samples and documents share rows (one forward) when the model passes the probe

    def __post_init__(self) -> None:
        _choice("train.schedule", self.schedule, ("cosine", "linear", "constant"))
        _choice("train.precision", self.precision, ("auto", "bf16", "fp16", "no"))
        for key in ("epochs", "max_steps", "batch_size", "grad_accum", "log_every"):
            _at_least(f"train.{key}", getattr(self, key), 1)
        for key in ("warmup_steps", "weight_decay", "max_grad_norm", "save_every", "keep_checkpoints"):
            _at_least(f"train.{key}", getattr(self, key), 0)
        _positive("train.lr", self.lr)
        if not 0 <= self.warmup_ratio <= 1:
            raise OneGenError(f"must be between 0 and 1, got {self.warmup_ratio}", field="train.warmup_ratio")
        if not 0 <= self.seed < 2**32:  # what numpy's and torch's seeding accept
            raise OneGenError(f"must be >= 0 and < 2**32, got {self.seed}", field="train.seed")
        if self.batch_size % self.grad_accum:
            raise OneGenError(f"must divide train.batch_size ({self.batch_size})", field="train.grad_accum")


@dataclass
class TrainConfig:
    """Everything a training run needs; written resolved into the run directory as config.yaml."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainSection = field(default_factory=TrainSection)
    output_dir: str | None = None  # required: the run directory
    _source: ClassVar[str | None] = None  # the file read (set per instance by from_dict): not a config key

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str | None = None) -> TrainConfig:
        """Build from nested dicts; errors name `source` (the config file), or the command-line override
        a bad value came from (`apply_overrides` records which keys it set)."""
        try:
            config = _build(cls, data, prefix="", source=source)
        except OneGenError as e:
            from_cli = [k for k in getattr(data, "overridden", ()) if keys_related(k, e.field)]
            if from_cli:
                e = OneGenError(f"{e.message} (set by the command-line override "
                                f"{', '.join('--' + k for k in from_cli)})", field=e.field)
            elif source and e.file is None:
                e = OneGenError(e.message, file=source, field=e.field)
            raise e from None
        config._source = source
        return config

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        """Read a YAML config. Relative paths written in the file are resolved against the file's folder
        (data and model paths: when the file is there); those given as `overrides` against the current
        directory."""
        path = Path(path)
        if not path.is_file():
            raise OneGenError("config file not found", file=str(path))
        data = read_yaml(path)
        data = _resolve_paths(data, path.parent)
        if overrides:
            data = apply_overrides(data, overrides)
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, self.to_yaml())

    def validate_for_training(self) -> None:
        """Check the keys a training run needs (not needed to merely build a config); errors name the
        config file the config was read from."""
        try:
            self._check_required()
        except OneGenError as e:
            raise OneGenError(e.message, file=self._source, field=e.field) from None

    def _check_required(self) -> None:
        if not self.output_dir:
            raise OneGenError("required: set output_dir (the run directory)", field="output_dir")
        if not self.data.train:
            raise OneGenError("required: the training samples (JSONL)", field="data.train")
        if not self.model.name_or_path and self.model.scratch is None:
            raise OneGenError("set model.name_or_path (a pretrained causal LM) or model.scratch "
                              "(an architecture to build)", field="model")
        if self.model.scratch is not None and not self.model.name_or_path and self.train.lora is not None:
            raise OneGenError("LoRA adapts pretrained weights: use model.name_or_path, or drop train.lora to "
                              "train the scratch model fully", field="train.lora")
        if self.model.scratch is not None and not self.tokenizer.name_or_path and self.tokenizer.train is None:
            raise OneGenError("a scratch model needs tokenizer.name_or_path or tokenizer.train",
                              field="tokenizer")


def _at_least(key: str, value: float | None, low: int) -> None:
    """`value` (None: not set, always fine) must be >= `low`."""
    if value is not None and value < low:
        raise OneGenError(f"must be >= {low}, got {value}", field=key)


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise OneGenError(f"must be > 0, got {value}", field=key)


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise OneGenError(f"'{value}' is not one of {', '.join(allowed)}", field=key)


def _build(cls: type, data: Any, prefix: str, source: str | None) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise OneGenError(f"expected a mapping, got {type(data).__name__}", field=prefix.rstrip(".") or None)
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise OneGenError(f"unknown key '{prefix}{unknown[0]}'; known keys here: {', '.join(sorted(names))}",
                          field=f"{prefix}{unknown[0]}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}", source)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str, source: str | None) -> Any:
    args = getattr(hint, "__args__", ())
    nested = [a for a in args if dataclasses.is_dataclass(a)] or ([hint] if dataclasses.is_dataclass(hint) else [])
    if nested:
        if value is None:
            return None
        return _build(nested[0], value, f"{key}.", source)
    if value is None:
        return None
    if get_origin(hint) is dict:
        if not isinstance(value, dict):
            raise OneGenError(f"expected a mapping, got {value!r}", field=key)
        return value
    base = [a for a in args if a is not type(None)] if args else [hint]
    if int in base and float not in base:
        if isinstance(value, int) and not isinstance(value, bool):  # `true` is no integer
            return value
        raise OneGenError(f"expected an integer, got {value!r}", field=key)
    if float in base:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-4` as a string: it needs a dot
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None or not math.isfinite(number):
            raise OneGenError(f"expected a finite number, got {value!r}", field=key)
        return number
    if bool in base:
        if isinstance(value, bool):
            return value
        raise OneGenError(f"expected true or false, got {value!r}", field=key)
    if str in base and not isinstance(value, str):
        raise OneGenError(f"expected a string, got {value!r}", field=key)
    return value
