"""The paper's workflow JSON, mapped onto a `TrainConfig` (`onegen train --workflow FILE.json`).

Its sections: `onegen` (loss_type BPR/InfoNCE, info_nce_temperature, n_neg_per_pos, lambda_r,
lambda_g), `special_token_list` (GEN/RET/CTX groups with descriptions), `info-data-db` /
`info-data-train` (file paths, repr_token, mask_token_from_to), `info-model`, `train` (HF
`TrainingArguments` names) and `resume_checkpoint_path`; README, "The paper's files", has the table.
The data files it names are read by `onegen.original`. Nothing here evaluates or imports what a file
names: the paper's code passes `templator` and `model_class` strings to `eval`; here they are looked
up in fixed tables and any other name is refused. A workflow never turns on `trust_remote_code`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .config import TokensConfig, TrainConfig
from .configfile import _resolve_paths, apply_overrides
from .errors import OneGenError

log = logging.getLogger(__name__)


# The `templator` names of the paper's code. onegen renders every one the same way: the tokenizer's chat
# template when it has one, else onegen's role prefixes; samples keep their paragraphs and query tokens.
KNOWN_TEMPLATORS = frozenset({
    "DocumentTemplator", "Qwen2Templator", "Llama2Templator", "Llama3Templator", "MistralTemplator",
    "GemmaTemplator", "SelfRAG_LLama2Templator", "SelfRAG_Llama2_DocTemplator", "EntityLinking_Llama2Templator",
})
SECTIONS = ("onegen", "special_token_list", "info-data-db", "info-data-train", "info-model", "train",
            "resume_checkpoint_path")
_KEYS = {
    "onegen": {"loss_type", "info_nce_temperature", "n_pos_per_sent", "n_neg_per_pos", "lambda_r", "lambda_g"},
    "info-data-db": {"file_path", "cache_file_path", "repr_token", "mask_token_from_to", "templator"},
    "info-data-train": {"file_path", "cache_file_path", "repr_token", "mask_token_from_to", "templator"},
    "info-model": {"model_path", "tokenizer_path", "model_type", "model_class", "max_length", "padding_side",
                   "padding_label_id", "padding_input_id"},
}
# HF TrainingArguments names -> (our config section, key, JSON type); batch size and precision are derived.
_NUM, _INT = (int, float), int
_TRAIN_MAP = {
    "learning_rate": ("train", "lr", _NUM), "num_train_epochs": ("train", "epochs", _NUM),
    "max_steps": ("train", "max_steps", _INT), "seed": ("train", "seed", _INT),
    "weight_decay": ("train", "weight_decay", _NUM), "warmup_steps": ("train", "warmup_steps", _INT),
    "warmup_ratio": ("train", "warmup_ratio", _NUM), "max_grad_norm": ("train", "max_grad_norm", _NUM),
    "save_steps": ("train", "save_every", _INT), "save_total_limit": ("train", "keep_checkpoints", _INT),
    "logging_steps": ("train", "log_every", _INT), "output_dir": (None, "output_dir", str),
    "gradient_checkpointing": ("model", "gradient_checkpointing", bool),
}
_TRAIN_DERIVED = {"per_device_train_batch_size", "gradient_accumulation_steps", "bf16", "fp16",
                  "lr_scheduler_type", "optim"}
# TrainingArguments names that do not change what onegen trains (with those of the installed transformers)
_TRAIN_IGNORED = {"do_eval", "do_train", "report_to", "load_best_model_at_end", "save_only_model", "deepspeed",
                  "local_rank", "logging_dir", "run_name", "save_strategy", "logging_strategy", "eval_strategy",
                  "evaluation_strategy", "per_device_eval_batch_size", "disable_tqdm", "remove_unused_columns",
                  "dataloader_num_workers", "ddp_find_unused_parameters", "overwrite_output_dir", "tf32",
                  "adam_beta1", "adam_beta2", "adam_epsilon", "push_to_hub", "logging_first_step"}
_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}
_OPTIMIZERS = {"adamw_torch", "adamw_torch_fused", "adamw_hf"}


def _causal_lm_class_names() -> frozenset[str]:
    """The paper's `model_class` values we accept: the class names transformers maps causal LMs to."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as names

    flat = {"AutoModelForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"}
    for value in names.values():
        flat.update([value] if isinstance(value, str) else value)
    return frozenset(flat)


class _Workflow:
    """The parsed JSON with its text, so that errors name file:line and the key."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise OneGenError("workflow file not found", file=str(path))
        try:
            self.text = path.read_text(encoding="utf-8")
            self.data = json.loads(self.text)
        except UnicodeDecodeError as e:
            raise OneGenError(f"not valid UTF-8 ({e.reason})", file=str(path)) from None
        except json.JSONDecodeError as e:
            raise OneGenError(f"malformed JSON ({e.msg} at column {e.colno})", file=str(path), line=e.lineno) from None
        if not isinstance(self.data, dict):
            raise OneGenError("expected a JSON object of sections", file=str(path), line=1)

    def error(self, message: str, *keys: str) -> OneGenError:
        pos, line = 0, None
        for key in keys:  # the line of the key, searched section by section
            i = self.text.find(json.dumps(key), pos)
            if i < 0:
                break
            pos, line = i, self.text.count("\n", 0, i) + 1
        return OneGenError(message, file=str(self.path), line=line, field=".".join(keys))

    def section(self, name: str, required: bool = True) -> dict[str, Any]:
        value = self.data.get(name)
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            raise self.error("missing or not a JSON object", name)
        unknown = sorted(set(value) - _KEYS[name]) if name in _KEYS else []
        if unknown:
            raise self.error(f"unknown key; known keys here: {', '.join(sorted(_KEYS[name]))}", name, unknown[0])
        return value

    def get(self, section: str, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        sec = self.data[section]
        if key not in sec or sec[key] is None:
            if default is ...:
                raise self.error("missing required key", section, key)
            return default
        value = sec[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            want = " or ".join(k.__name__ for k in kinds)
            raise self.error(f"expected {want}, got {json.dumps(value)}", section, key)
        return value

    def one_string(self, section: str, key: str) -> str:
        value = self.get(section, key, list)
        if len(value) != 1 or not isinstance(value[0], str) or not value[0]:
            raise self.error("onegen reads exactly one representation token per file (a list of one string)",
                             section, key)
        return value[0]


def load_workflow(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Map a workflow JSON of the paper's repository onto a `TrainConfig` (README, "The paper's files").

    Relative paths are resolved as in a YAML config (against the workflow's folder when the file is
    there); `overrides` are dotted onegen config keys (`--train.max_steps 2`) applied last."""
    w = _Workflow(Path(path))
    unknown = sorted(set(w.data) - set(SECTIONS))
    if unknown:
        raise w.error(f"unknown section; the paper's workflow has {', '.join(SECTIONS)}", unknown[0])
    for name in SECTIONS[:-1]:
        w.section(name)
    cfg: dict[str, Any] = {"train": {"seed": 42}}  # HF's default seed
    cfg["loss"] = _loss(w)
    cfg["tokens"] = _tokens(w)
    cfg["model"], cfg["tokenizer"], max_length = _model(w)
    cfg["data"] = {"format": "onegen-original", "task": "qa", "max_length": max_length, "doc_max_length": max_length}
    for key, sec in (("train", "info-data-train"), ("corpus", "info-data-db")):
        cfg["data"][key] = w.get(sec, "file_path", str)
        if not cfg["data"][key]:
            raise w.error("required: the path of the paper's JSONL file", sec, "file_path")
        templator = w.get(sec, "templator", str, "DocumentTemplator")
        if templator not in KNOWN_TEMPLATORS:
            raise w.error(f"'{templator}' is not a templator of the paper's code; known: "
                          f"{', '.join(sorted(KNOWN_TEMPLATORS))} (onegen never evaluates names from files)",
                          sec, "templator")
        if w.data[sec].get("cache_file_path"):
            log.info("%s.cache_file_path is not read (the paper's caches are pickles; onegen reads the JSONL)", sec)
    _train(w, cfg)
    if w.data.get("resume_checkpoint_path") is not None:
        log.warning("resume_checkpoint_path is ignored: onegen resumes from the last checkpoint in output_dir")
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    cfg = _resolve_paths(cfg, w.path.parent)
    return TrainConfig.from_dict(cfg, source=str(w.path))


def _loss(w: _Workflow) -> dict[str, Any]:
    loss_type = w.get("onegen", "loss_type", str)
    kind = {"bpr": "bpr", "infonce": "infonce"}.get(loss_type.lower())
    if kind is None:
        raise w.error(f"'{loss_type}' is not BPR or InfoNCE", "onegen", "loss_type")
    for key in ("n_pos_per_sent", "n_neg_per_pos"):
        if w.get("onegen", key, int, 1) < (1 if key == "n_pos_per_sent" else 0):
            raise w.error("out of range", "onegen", key)
    temperature = float(w.get("onegen", "info_nce_temperature", (int, float), 0.02))
    # The paper's BPR scores raw cosines against the query's own negatives; its InfoNCE scores every
    # positive and negative of the batch, divided by the temperature.
    return {"type": kind, "temperature": temperature if kind == "infonce" else 1.0,
            "negatives": w.get("onegen", "n_neg_per_pos", int, 4), "in_batch_negatives": kind == "infonce",
            "lm_weight": float(w.get("onegen", "lambda_g", (int, float), 1.0)),
            "retrieval_weight": float(w.get("onegen", "lambda_r", (int, float), 1.0))}


def _tokens(w: _Workflow) -> dict[str, Any]:
    unknown = sorted(set(w.data["special_token_list"]) - {"GEN", "RET", "CTX"})
    if unknown:
        raise w.error("unknown token group; the groups are GEN, RET and CTX", "special_token_list", unknown[0])
    groups = {g: w.data["special_token_list"].get(g) or {} for g in ("GEN", "RET", "CTX")}
    described: dict[str, str] = {}
    for g, tokens in groups.items():
        if not isinstance(tokens, dict) or not all(isinstance(v, str) for v in tokens.values()):
            raise w.error("expected an object of token -> description", "special_token_list", g)
        for token in tokens:
            if token in described:
                raise w.error(f"token '{token}' is listed twice", "special_token_list", g)
            described[token] = tokens[token]
    query, doc = w.one_string("info-data-train", "repr_token"), w.one_string("info-data-db", "repr_token")
    for token, sec in ((query, "info-data-train"), (doc, "info-data-db")):
        if token not in groups["RET"]:
            raise w.error(f"'{token}' must be listed in special_token_list.RET", sec, "repr_token")
    if w.get("info-data-db", "mask_token_from_to", list, []):
        raise w.error("documents have no context spans in onegen; expected []", "info-data-db", "mask_token_from_to")
    pairs = w.get("info-data-train", "mask_token_from_to", list, [])
    pairs = [pairs] if pairs and all(isinstance(p, str) for p in pairs) else pairs
    if len(pairs) > 1 or pairs and (not isinstance(pairs[0], list) or len(pairs[0]) != 2
                                     or not all(isinstance(t, str) and t in described for t in pairs[0])):
        raise w.error("expected [] or one [open, close] pair of tokens listed in special_token_list",
                      "info-data-train", "mask_token_from_to")
    default = TokensConfig()
    open_, close = pairs[0] if pairs else (default.open, default.close)
    roles = {"query": query, "doc": doc, "open": open_, "close": close}
    descriptions = {k: described.get(t, default.descriptions[k]) for k, t in roles.items()}
    extra = {t: d for t, d in described.items() if t not in roles.values()}
    return {**roles, "descriptions": descriptions, "extra": extra}


def _model(w: _Workflow) -> tuple[dict[str, Any], dict[str, Any], int]:
    model_path = w.get("info-model", "model_path", str)
    if not model_path:
        raise w.error("required: a local checkpoint directory or hub id", "info-model", "model_path")
    model_class = w.get("info-model", "model_class", str, "AutoModelForCausalLM")
    if model_class not in _causal_lm_class_names():
        raise w.error(f"'{model_class}' is not a causal-LM class name that transformers knows (e.g. "
                      "LlamaForCausalLM); onegen never evaluates names from files", "info-model", "model_class")
    w.get("info-model", "model_type", str, "")  # a label in the paper's code; the checkpoint's config decides
    if w.get("info-model", "padding_side", str, "right") not in ("right", "left"):
        raise w.error("expected right or left", "info-model", "padding_side")
    for key in ("padding_label_id", "padding_input_id"):  # onegen pads with the tokenizer's pad id, -100 labels
        w.get("info-model", key, int, 0)
    tokenizer_path = w.get("info-model", "tokenizer_path", str, "")
    tokenizer = {"name_or_path": tokenizer_path} if tokenizer_path and tokenizer_path != model_path else {}
    max_length = w.get("info-model", "max_length", int, 1024)
    return {"name_or_path": model_path}, tokenizer, max_length


def _train(w: _Workflow, cfg: dict[str, Any]) -> None:
    t = w.data["train"]
    known = _TRAIN_IGNORED | set(_TRAIN_MAP) | _TRAIN_DERIVED
    try:
        import dataclasses

        from transformers import TrainingArguments

        known |= {f.name for f in dataclasses.fields(TrainingArguments)}
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    ignored = []
    for key, value in t.items():
        if key not in known:
            raise w.error("not a transformers TrainingArguments name that onegen knows", "train", key)
        if key in _TRAIN_MAP and value is not None:
            section, name, kind = _TRAIN_MAP[key]
            value = w.get("train", key, kind)
            if key == "num_train_epochs":
                if not float(value).is_integer():
                    raise w.error("onegen trains whole epochs; set max_steps for a part", "train", key)
                value = int(value)
            if key == "max_steps" and value <= 0:
                value = None  # HF's -1: not set
            (cfg if section is None else cfg.setdefault(section, {}))[name] = value
        elif key not in _TRAIN_DERIVED and value not in (None, False, [], "", "none"):
            ignored.append(key)
    per_device = w.get("train", "per_device_train_batch_size", int, 8)
    accum = w.get("train", "gradient_accumulation_steps", int, 1)
    if per_device < 1 or accum < 1:
        raise w.error("must be >= 1", "train", "per_device_train_batch_size" if per_device < 1 else
                      "gradient_accumulation_steps")
    cfg["train"].update(batch_size=per_device * accum, grad_accum=accum)
    bf16, fp16 = w.get("train", "bf16", bool, None), w.get("train", "fp16", bool, None)
    if bf16 and fp16:
        raise w.error("bf16 and fp16 cannot both be true", "train", "fp16")
    if bf16 is not None or fp16 is not None:
        cfg["train"]["precision"] = "bf16" if bf16 else "fp16" if fp16 else "no"
    schedule = w.get("train", "lr_scheduler_type", str, "linear")  # HF's default schedule is linear
    if schedule not in _SCHEDULES:
        raise w.error(f"onegen schedules are {', '.join(_SCHEDULES)}", "train", "lr_scheduler_type")
    cfg["train"]["schedule"] = _SCHEDULES[schedule]
    if w.get("train", "optim", str, "adamw_torch") not in _OPTIMIZERS:
        raise w.error(f"onegen trains with torch AdamW ({', '.join(sorted(_OPTIMIZERS))})", "train", "optim")
    if ignored:
        log.warning("workflow train keys with no effect in onegen: %s (DeepSpeed/FSDP come from `accelerate "
                    "launch`)", ", ".join(sorted(ignored)))
