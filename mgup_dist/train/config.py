"""Command line and config files of ``mgup-dist train``.

A run is described by flags; ``--config FILE`` (YAML or JSON, keys = flag names with
``_`` or ``-``) supplies defaults that flags given on the command line override.  Every
check that can fail on user input runs in :func:`parse` / :func:`validate`, before any
process group, model or data exists.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
from typing import Dict, Optional, Sequence

__all__ = ["OPTIMIZER_NAMES", "ENGINES", "parse", "validate", "resolve_model_config", "resolve_deepspeed_config",
           "REPO_ROOT", "BUILTIN_MODELS", "fingerprint"]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

#: --lr / --muon-lr above this are refused (see validate)
MAX_LR = 10.0

OPTIMIZER_NAMES = ("adamw", "cautious_adamw", "mgup_adamw", "cmgup_adamw", "lion", "mgup_lion", "muon", "mgup_muon")
ENGINES = ("ddp", "fsdp2", "deepspeed")
PRECISIONS = ("auto", "bf16", "fp32")

# The two model configs, also shipped as configs/models/llama_<name>.json (a test keeps
# them equal) so that `mgup-dist train` works from an installed wheel with no checkout.
BUILTIN_MODELS: Dict[str, Dict] = {
    # GaLore's C4 benchmark model (jiaweizzhao/GaLore configs/llama_130m.json), in
    # transformers' LlamaConfig field names.
    "130m": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 768, "intermediate_size": 2048, "num_attention_heads": 12, "num_key_value_heads": 12,
        "num_hidden_layers": 12, "vocab_size": 32000, "max_position_embeddings": 1024,
        "initializer_range": 0.02, "rms_norm_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 1,
        "pad_token_id": 0, "tie_word_embeddings": False, "use_cache": False,
    },
    # ~0.87M parameters over the byte tokenizer (vocab 259): trains on one CPU core in minutes.
    "tiny": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 128, "intermediate_size": 352, "num_attention_heads": 4, "num_key_value_heads": 4,
        "num_hidden_layers": 4, "vocab_size": 259, "max_position_embeddings": 512,
        "initializer_range": 0.02, "rms_norm_eps": 1e-6, "bos_token_id": 256, "eos_token_id": 257,
        "pad_token_id": 258, "tie_word_embeddings": False, "use_cache": False,
    },
}


class _HelpFormatter(argparse.HelpFormatter):
    """Append "(default: X)" once: not when the help already states its default, not for None/False."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or action.default in (None, False, argparse.SUPPRESS)
                or action.option_strings == [] or action.nargs == 0):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mgup-dist train",
        description="Train a LLaMA causal LM with AdamW or the MGUP optimizer family on DDP, FSDP2 or DeepSpeed. "
                    "With no arguments: the tiny model on text shipped with Python, on this machine's device.",
        formatter_class=_HelpFormatter,
    )
    a = p.add_argument
    a("--config", default=None, help="YAML or JSON file of defaults (keys = flag names); flags override it")
    g = p.add_argument_group("run")
    g.add_argument("--name", default=None, help="run name (default: <model>-<optimizer>-<engine>)")
    g.add_argument("--out-dir", default=None, help="output directory (default: runs/<name>)")
    g.add_argument("--seed", type=int, default=0, help="seed of model init, data order and dropout")
    g.add_argument("--resume", nargs="?", const="latest", default="auto",
                   help="'auto': continue from the latest checkpoint of this run when one exists (what a torchrun "
                        "restart needs); '--resume' alone / 'latest': require one; 'never': start over (deletes "
                        "old checkpoints); or a checkpoint directory")
    g.add_argument("--save-every", type=int, default=100, help="checkpoint every N optimizer steps (0: only at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="how many newest checkpoints to keep")
    g.add_argument("--no-save", action="store_true",
                   help="write no checkpoint, not even the final one (throughput checks, smoke runs)")
    g.add_argument("--log-every", type=int, default=10, help="log train loss / lr / tokens per s every N steps")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar (a log line every --log-every steps)")
    g.add_argument("--no-plots", action="store_true", help="write no PNG plots at the end")
    g.add_argument("--no-tensorboard", action="store_true", help="write no tensorboard events")
    m = p.add_argument_group("model and data")
    m.add_argument("--model", default="tiny", help="'tiny', '130m' (configs/models/llama_<name>.json) or a JSON path")
    m.add_argument("--vocab-size", default=None,
                   help="override the model's vocab size; 'auto' = the tokenizer's size")
    m.add_argument("--dataset", default="embedded", choices=("embedded", "c4", "pysource"),
                   help="embedded: Python's own docs, offline; c4: allenai/c4 (see --data-path); "
                        "pysource: the *.py files installed here (mgup_dist/train/pysource.py), byte tokens")
    m.add_argument("--pysource-roots", default=None,
                   help="pysource: directories to read, separated by ',' or os.pathsep (default: stdlib + site-packages)")
    m.add_argument("--pysource-max-bytes", type=int, default=None,
                   help="pysource: cap on the source bytes read into each split (default: all)")
    m.add_argument("--data-path", default=None,
                   help="directory of C4 shards c4-train.*.json.gz and c4-validation.*.json.gz (implies --dataset c4); "
                        "without it --dataset c4 streams allenai/c4 'en' from the hub (needs `datasets`)")
    m.add_argument("--tokenizer", default=None,
                   help="'byte' (no download) or a transformers tokenizer name/path (default: byte for embedded, "
                        "t5-base for c4, as in GaLore)")
    m.add_argument("--packing", default=None, choices=("pack", "pad"),
                   help="C4 samples: 'pad' = one document per sample truncated/padded (GaLore); 'pack' = documents "
                        "joined and cut (default: pad for c4)")
    m.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    o = p.add_argument_group("optimization")
    o.add_argument("--optimizer", default="mgup_adamw", help=f"one of {', '.join(OPTIMIZER_NAMES)}")
    o.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (after warmup)")
    o.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    o.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of --steps")
    o.add_argument("--steps", type=int, default=600, help="optimizer steps")
    o.add_argument("--global-batch", type=int, default=16, help="sequences per optimizer step, all ranks together")
    o.add_argument("--micro-batch", type=int, default=None,
                   help="sequences per forward on one rank (default: global batch / world size, no accumulation)")
    o.add_argument("--weight-decay", type=float, default=0.0, help="decoupled; applied to matrices only")
    o.add_argument("--beta1", type=float, default=None, help="beta1 (default: 0.9)")
    o.add_argument("--beta2", type=float, default=None, help="beta2 (default: 0.999 AdamW, 0.99 Lion, 0.95 Muon)")
    o.add_argument("--eps", type=float, default=1e-8, help="Adam eps, added to sqrt(v_hat)")
    o.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0: off)")
    o.add_argument("--max-skipped-steps", type=int, default=10,
                   help="stop with an error after this many consecutive steps skipped for a non-finite gradient norm")
    o.add_argument("--mask-ratio", type=float, default=None, help="MGUP: fraction of coordinates scaled by alpha")
    o.add_argument("--alpha", type=float, default=None, help="MGUP: scale of the selected coordinates (default 2)")
    o.add_argument("--gamma", type=float, default=None, help="MGUP: scale of the others (default 0.5)")
    o.add_argument("--tau", type=float, default=None, help="MGUP shorthand: alpha = 1/tau, gamma = tau")
    o.add_argument("--scope", default=None, help="MGUP selection scope: tensor | shard | global | global_approx")
    o.add_argument("--muon-lr", type=float, default=None, help="muon, mgup_muon: lr of the matrices (default 2e-2)")
    o.add_argument("--opt-kwargs", default=None, help="JSON object of extra optimizer keyword arguments")
    e = p.add_argument_group("engine and device")
    e.add_argument("--engine", default="ddp", help=f"one of {', '.join(ENGINES)}")
    e.add_argument("--deepspeed-config", default="zero2",
                   help="deepspeed engine: a JSON path or a name in configs/deepspeed (zero1, zero2, zero2_offload, zero3)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | npu (via mgup_dist.device)")
    e.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a collective may wait for the other ranks before the run fails with an error "
                        "naming it (a frozen or lost rank); raise it for very slow checkpoint writes")
    e.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto = bf16 autocast where mgup_dist.device.supports_bf16 says so (fp32 master weights)")
    # Launchers that append --local_rank (DeepSpeed without --no_local_rank): accepted, unused
    # (LOCAL_RANK from the environment is what counts).
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--eval-every", type=int, default=100, help="validation every N optimizer steps")
    ev.add_argument("--eval-tokens", type=int, default=65536, help="validation tokens per evaluation (all ranks)")
    ev.add_argument("--eval-micro-batch", type=int, default=None, help="validation sequences per forward (default: --micro-batch)")
    return p


def _load_config_file(path: str) -> Dict:
    if not os.path.isfile(path):
        raise ValueError(f"config: file {path!r} does not exist")
    text = pathlib.Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as e:
            raise ValueError("config: YAML files need PyYAML (`pip install pyyaml`) or use a .json file") from e
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config: {path!r} is not valid YAML: {e}") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config: {path!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"config: {path!r} must hold a mapping of flag names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _check_file_values(p: argparse.ArgumentParser, values: Dict, path: str) -> None:
    """A config file's values skip argparse's conversion: check each against its flag's
    type and choices, by name (a YAML ``true`` for --steps would otherwise run 1 step)."""
    actions = {a.dest: a for a in p._actions}
    for key, v in values.items():
        a = actions[key]
        where = f"config: {key!r} in {path!r}"
        if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(v, bool):
                raise ValueError(f"{where} must be true or false, got {v!r}")
            continue
        if v is None:
            if a.default is None:
                continue
            raise ValueError(f"{where} must not be null (the flag's default is {a.default!r}; leave the key out "
                             "for the default)")
        if key == "opt_kwargs" and isinstance(v, dict):
            continue
        if isinstance(v, (list, dict)):
            raise ValueError(f"{where} must be a single value, got a {type(v).__name__}: {v!r}")
        if a.type in (int, float) and isinstance(v, str):
            # as on the command line (YAML reads 1e-3 as a string): the flag's own conversion
            try:
                v = values[key] = a.type(v)
            except ValueError:
                raise ValueError(f"{where} must be {'an integer' if a.type is int else 'a number'}, got {v!r}") from None
        if a.type is int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{where} must be an integer, got {v!r}")
        elif a.type is float:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{where} must be a number, got {v!r}")
            values[key] = float(v)
        elif isinstance(v, bool):
            raise ValueError(f"{where} must be a string, got {v!r}")
        elif key == "vocab_size" and isinstance(v, int):
            pass
        elif not isinstance(v, str):
            raise ValueError(f"{where} must be a string, got {v!r}")
        if a.choices is not None and values[key] not in a.choices:
            raise ValueError(f"{where}: {v!r} is not one of {', '.join(map(str, a.choices))}")


def parse(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None) -> argparse.Namespace:
    """Parse and validate.  Raises ValueError (never SystemExit) for bad values; argparse
    still exits for malformed flags and ``--help``."""
    p = _parser()
    argv = _attach_negative_values(p, argv if argv is not None else [])
    pre, _ = p.parse_known_args(argv)
    if pre.config:
        file_values = _load_config_file(pre.config)
        known = {a.dest for a in p._actions}
        unknown = sorted(set(file_values) - known)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown} in {pre.config!r}; allowed: {sorted(known - {'help', 'config'})}")
        _check_file_values(p, file_values, pre.config)
        p.set_defaults(**file_values)
    cfg = p.parse_args(argv)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world_size)
    return cfg


def _attach_negative_values(p: argparse.ArgumentParser, argv: Sequence[str]) -> list:
    """``--lr -3e-4`` -> ``--lr=-3e-4``: argparse takes a value that starts with '-' and is not
    a plain decimal (an exponent) for a flag and fails with "expected one argument"; joined,
    the value reaches validation and gets its own one-line error."""
    out = list(argv)
    for i in range(len(out) - 1):
        act = p._option_string_actions.get(out[i])
        if act is None or act.nargs is not None or not out[i + 1].startswith("-"):
            continue
        try:
            float(out[i + 1])
        except ValueError:
            continue
        out[i], out[i + 1] = f"{out[i]}={out[i + 1]}", None
    return [a for a in out if a is not None]


def canonical_optimizer_name(name):
    """The recipe's name for ``name``, which may also be a class name, in any case
    (``MGUPAdamW``, ``mgupadamw`` -> ``mgup_adamw``; ``AdamW`` -> ``adamw``), as DeepSpeed's
    ``optimizer.type`` matches; unknown names are returned unchanged (validation names them)."""
    if not isinstance(name, str):
        return name
    key = name.replace("_", "").replace("-", "").lower()
    table = {n.replace("_", ""): n for n in OPTIMIZER_NAMES}
    return table.get(key, name)


def _read_json_object(path, flag: str, what: str) -> Dict:
    """A JSON file that must hold an object; ValueError naming ``flag`` and the file otherwise."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{flag}: {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{flag}: {str(path)!r} must hold a JSON object ({what}), got a {type(data).__name__}")
    return data


def _load_model_json(path) -> Dict:
    data = _read_json_object(path, "model", "LlamaConfig fields")
    _check_model_fields(data, str(path))
    return data


# Sizes a LlamaConfig must have as positive integers (vocab_size may come from --vocab-size).
_MODEL_SIZES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                "max_position_embeddings")


def _check_model_fields(data: Dict, where: str) -> None:
    """Unknown keys (a typo such as ``num_hidden_layer`` would build LlamaConfig's default
    32-layer model) and non-positive sizes are refused by name."""
    from transformers import LlamaConfig

    known = set(LlamaConfig().to_dict()) | set(LlamaConfig.attribute_map) | {
        "architectures", "transformers_version", "model_type", "torch_dtype", "dtype", "head_dim", "rope_scaling",
        "rope_theta", "rope_parameters", "pretraining_tp", "attention_bias", "attention_dropout", "mlp_bias"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"model: {where!r} has keys LlamaConfig does not know: {unknown} (a typo? e.g. "
                         "num_hidden_layers, hidden_size, vocab_size)")
    for key in _MODEL_SIZES + ("vocab_size", "num_key_value_heads"):
        v = data.get(key)
        if key in _MODEL_SIZES and v is None:
            raise ValueError(f"model: {where!r} lacks {key!r} (a positive integer)")
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"model: {where!r}: {key} must be a positive integer, got {v!r}")
    if data["hidden_size"] % data["num_attention_heads"]:
        raise ValueError(f"model: {where!r}: hidden_size {data['hidden_size']} is not divisible by "
                         f"num_attention_heads {data['num_attention_heads']}")


def resolve_model_config(spec: str) -> Dict:
    if os.path.isfile(spec):
        return _load_model_json(spec)
    path = REPO_ROOT / "configs" / "models" / f"llama_{spec}.json"
    if path.is_file():
        return _load_model_json(path)
    if spec in BUILTIN_MODELS:
        return dict(BUILTIN_MODELS[spec])
    raise ValueError(f"model: unknown model {spec!r}; allowed: {', '.join(sorted(BUILTIN_MODELS))} or a path to a "
                     "LlamaConfig JSON file")


def resolve_deepspeed_config(spec: str) -> Dict:
    path = spec if os.path.isfile(spec) else str(REPO_ROOT / "configs" / "deepspeed" / f"{spec}.json")
    if os.path.isfile(path):
        return _read_json_object(path, "deepspeed_config", "DeepSpeed config keys")
    if spec in ("zero0", "zero1", "zero2", "zero3"):
        # Minimal stand-in while configs/deepspeed/ is absent (e.g. an installed wheel).
        return {"zero_optimization": {"stage": int(spec[-1])}}
    raise ValueError(f"deepspeed_config: {spec!r} is neither a file nor a name in {REPO_ROOT / 'configs' / 'deepspeed'}")


def validate(cfg: argparse.Namespace, world_size: int) -> None:
    def bad(param, msg):
        raise ValueError(f"{param}: {msg}")

    cfg.optimizer = canonical_optimizer_name(cfg.optimizer)
    if cfg.optimizer not in OPTIMIZER_NAMES:
        bad("optimizer", f"unknown optimizer {cfg.optimizer!r}; allowed: {', '.join(OPTIMIZER_NAMES)} (or their class "
                         "names in any case, e.g. MGUPAdamW)")
    if cfg.engine not in ENGINES:
        bad("engine", f"unknown engine {cfg.engine!r}; allowed: {', '.join(ENGINES)}")
    if cfg.optimizer == "muon" and cfg.engine != "ddp":
        bad("optimizer", f"'muon' (torch.optim.Muon) orthogonalises whole local tensors: engine 'ddp' only, not "
                         f"{cfg.engine!r}; 'mgup_muon' runs sharded")
    cfg.model_config = resolve_model_config(cfg.model)
    if cfg.vocab_size is None and "vocab_size" not in cfg.model_config:
        bad("model", f"{cfg.model!r} has no vocab_size; add it or pass --vocab-size N / auto")
    if cfg.engine == "deepspeed":
        cfg.deepspeed_dict = resolve_deepspeed_config(cfg.deepspeed_config)
    if cfg.data_path is not None:
        cfg.dataset = "c4"
        if not os.path.isdir(cfg.data_path):
            bad("data_path", f"directory {cfg.data_path!r} does not exist")
        from .data import c4_local_files
        from .data import check_first_record
        for split in ("train", "validation"):
            for f in c4_local_files(cfg.data_path, split):
                check_first_record(f)
    if cfg.dataset == "pysource":
        if cfg.tokenizer not in (None, "byte"):
            bad("tokenizer", f"--dataset pysource uses the byte tokenizer, got {cfg.tokenizer!r}")
        from .pysource import parse_roots
        parse_roots(cfg.pysource_roots)
        if cfg.pysource_max_bytes is not None and cfg.pysource_max_bytes <= 0:
            bad("pysource_max_bytes", f"must be positive, got {cfg.pysource_max_bytes}")
    if cfg.name is not None:
        _check_name(cfg.name)
    if not (math.isfinite(cfg.timeout) and cfg.timeout > 0):
        bad("timeout", f"must be a positive number of seconds, got {cfg.timeout}")
    if cfg.tokenizer is None:
        cfg.tokenizer = "byte" if cfg.dataset in ("embedded", "pysource") else "t5-base"
    if cfg.packing is None:
        cfg.packing = "pad" if cfg.dataset == "c4" else "pack"
    for name in ("steps", "global_batch", "seq_len", "eval_every", "log_every", "eval_tokens"):
        if getattr(cfg, name) <= 0:
            bad(name, f"must be positive, got {getattr(cfg, name)}")
    for name in ("save_every", "keep_checkpoints"):
        if getattr(cfg, name) < 0:
            bad(name, f"must be >= 0, got {getattr(cfg, name)}")
    if cfg.keep_checkpoints == 0:
        cfg.keep_checkpoints = 1
    if cfg.micro_batch is None:
        if cfg.global_batch % world_size:
            bad("global_batch", f"{cfg.global_batch} is not divisible by the world size {world_size}")
        cfg.micro_batch = cfg.global_batch // world_size
    if cfg.micro_batch <= 0:
        bad("micro_batch", f"must be positive, got {cfg.micro_batch}")
    if cfg.global_batch % (cfg.micro_batch * world_size):
        bad("global_batch", f"{cfg.global_batch} is not divisible by micro_batch x world_size = "
                            f"{cfg.micro_batch} x {world_size}")
    cfg.grad_accum = cfg.global_batch // (cfg.micro_batch * world_size)
    cfg.world_size = world_size
    if cfg.eval_micro_batch is None:
        cfg.eval_micro_batch = cfg.micro_batch
    cfg.warmup_given = cfg.warmup_steps is not None   # a continued run keeps its checkpoint's warmup otherwise
    if cfg.warmup_steps is None:
        cfg.warmup_steps = max(1, cfg.steps // 10)
    cfg.schedule_steps = cfg.steps
    if not 0 <= cfg.warmup_steps <= cfg.steps:
        bad("warmup_steps", f"must be in [0, steps={cfg.steps}], got {cfg.warmup_steps}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        bad("min_lr_ratio", f"must be in [0, 1], got {cfg.min_lr_ratio}")
    for name in ("lr", "muon_lr"):
        v = getattr(cfg, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            bad(name, f"must be positive and finite, got {v}")
        if v is not None and v > MAX_LR:
            bad(name, f"{v:g} is above {MAX_LR:g}: every optimizer here scales its step by lr (Adam's and Lion's "
                      f"steps are about lr per coordinate), so the weights would leave any trained range at the first "
                      f"step; typical values are 1e-4 to 2e-2")
    for name in ("weight_decay", "eps", "muon_lr", "beta1", "beta2"):
        v = getattr(cfg, name)
        if v is not None and not math.isfinite(v):
            bad(name, f"must be finite, got {v}")
    if not (math.isfinite(cfg.grad_clip) and cfg.grad_clip >= 0):
        bad("grad_clip", f"must be >= 0 and finite (0: off), got {cfg.grad_clip}")
    if cfg.max_skipped_steps < 1:
        bad("max_skipped_steps", f"must be >= 1, got {cfg.max_skipped_steps}")
    if cfg.eval_micro_batch is not None and cfg.eval_micro_batch <= 0:
        bad("eval_micro_batch", f"must be positive, got {cfg.eval_micro_batch}")
    max_pos = cfg.model_config.get("max_position_embeddings", 2048)
    if cfg.seq_len > max_pos:
        bad("seq_len", f"{cfg.seq_len} exceeds the model's max_position_embeddings {max_pos}")
    if cfg.precision not in PRECISIONS:
        bad("precision", f"allowed: {', '.join(PRECISIONS)}")
    if cfg.opt_kwargs is not None and not isinstance(cfg.opt_kwargs, dict):
        try:
            cfg.opt_kwargs = json.loads(cfg.opt_kwargs)
        except json.JSONDecodeError as e:
            bad("opt_kwargs", f"not a JSON object: {e}")
        if not isinstance(cfg.opt_kwargs, dict):
            bad("opt_kwargs", "must be a JSON object")
    if cfg.opt_kwargs:
        from .optim import check_opt_kwargs

        check_opt_kwargs(cfg.optimizer, cfg.opt_kwargs)   # unknown keys named alone, with a did-you-mean
        # One source of truth: a setting with its own flag is set by that flag (which
        # config.json, the resume checks and the DeepSpeed file checks all read).
        # The MGUP flags default to unset: the kwarg may carry them then (a baseline run
        # drops them with --opt-kwargs '{}'), never both.
        owned = sorted(k for k in cfg.opt_kwargs if k in _FLAG_OF_KWARG
                       and (k in ("lr", "betas", "eps", "weight_decay", "adamw_lr") or getattr(cfg, k) is not None))
        if owned:
            bad("opt_kwargs", "; ".join(f"{k!r} is set by its own flag: pass {_FLAG_OF_KWARG[k]} only" for k in owned))
    if cfg.vocab_size is not None and cfg.vocab_size != "auto":
        try:
            cfg.vocab_size = int(cfg.vocab_size)
        except (TypeError, ValueError):
            bad("vocab_size", f"an integer or 'auto', got {cfg.vocab_size!r}")
    if cfg.resume not in ("auto", "latest", "never") and not os.path.isdir(cfg.resume):
        bad("resume", f"'auto', 'latest', 'never' or an existing checkpoint directory; got {cfg.resume!r}")
    from mgup_dist.device import resolve_device
    cfg.device_obj = resolve_device(cfg.device)   # ValueError for unknown / unavailable kinds
    if cfg.engine == "deepspeed":
        from .dsconfig import check_deepspeed_file

        check_deepspeed_file(cfg)   # a user's file: conflicts with the flags are refused by name
    if cfg.name is None:
        model_tag = cfg.model if cfg.model in BUILTIN_MODELS else pathlib.Path(cfg.model).stem
        cfg.name = f"{model_tag}-{cfg.optimizer}-{cfg.engine}"
    if cfg.out_dir is None:
        cfg.out_dir = os.path.join("runs", cfg.name)
    _check_out_dir(cfg.out_dir)


# optimizer keyword -> the flag that sets it (never through --opt-kwargs)
_FLAG_OF_KWARG = {"lr": "--lr (--muon-lr for mgup_muon's matrices)", "betas": "--beta1/--beta2", "eps": "--eps",
                  "weight_decay": "--weight-decay", "mask_ratio": "--mask-ratio", "alpha": "--alpha",
                  "gamma": "--gamma", "tau": "--tau", "scope": "--scope", "adamw_lr": "--lr"}


# A directory name's limit on common filesystems (ext4, xfs, btrfs: 255 bytes), less room
# for what the run appends below runs/<name>.
_NAME_MAX = 200
# Paths the run writes under --out-dir add up to ~80 characters (checkpoints/step_N.tmp/...).
_OUT_DIR_MAX = 4096 - 128


def _check_name(name: str) -> None:
    """A run name names a directory under runs/; it is never a path."""
    if (not isinstance(name, str) or not name.strip() or "/" in name or os.sep in name
            or (os.altsep and os.altsep in name) or name in (".", "..") or "\0" in name):
        raise ValueError(f"name: {name!r} is not a run name: use letters, digits, '-', '_' or '.', without path "
                         "separators or '..' (to write elsewhere, pass --out-dir)")
    if len(name.encode("utf-8")) > _NAME_MAX:
        raise ValueError(f"name: {len(name.encode('utf-8'))} bytes long ({name[:40]!r}...); a run name is a directory "
                         f"name: at most {_NAME_MAX} bytes")


def _check_out_dir(out_dir: str) -> None:
    """--out-dir must be a directory, or creatable: the nearest existing ancestor is a
    writable directory.  (The trainer also writes a probe file before any work, which
    catches what permission bits cannot tell, e.g. a read-only mount.)"""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir: {out_dir!r} exists and is not a directory")
    ck = os.path.join(out_dir, "checkpoints")
    if os.path.exists(ck) and not os.path.isdir(ck):
        raise ValueError(f"out_dir: {ck!r} exists and is not a directory; move it away (checkpoints are written "
                         "there)")
    p = os.path.abspath(out_dir)
    long_part = max(p.split(os.sep), key=len)
    if len(p.encode("utf-8")) > _OUT_DIR_MAX or len(long_part.encode("utf-8")) > 255:
        raise ValueError(f"out_dir: {out_dir[:60]!r}... is too long for the filesystem (path {len(p.encode('utf-8'))} "
                         f"bytes, at most {_OUT_DIR_MAX}; one name {len(long_part.encode('utf-8'))} bytes, at most 255)")
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise ValueError(f"out_dir: {out_dir!r} cannot be created: {p!r} is a file")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"out_dir: {out_dir!r} is not writable ({p!r})")


# What must match for an automatic resume to be the same run.
_FINGERPRINT_KEYS = ("model", "optimizer", "engine", "steps", "global_batch", "seq_len", "lr", "dataset",
                     "tokenizer", "seed", "min_lr_ratio", "warmup_steps", "weight_decay", "mask_ratio", "alpha",
                     "gamma", "tau", "scope", "packing", "pysource_roots", "pysource_max_bytes", "schedule_steps")


def fingerprint(cfg) -> Dict:
    """The settings that make a run the same run, as the optimizer resolves them: passing
    a default explicitly (--tau 0.5, --mask-ratio 0.5) is no change.  The vocabulary is
    compared after the tokenizer is built (--vocab-size auto may equal the model's)."""
    fp = {k: getattr(cfg, k, None) for k in _FINGERPRINT_KEYS}
    fp["schedule_steps"] = fp["schedule_steps"] or cfg.steps
    if cfg.optimizer not in ("adamw", "muon"):
        from .optim import optimizer_spec

        _, kw = optimizer_spec(cfg)
        tau = kw.get("tau")
        fp["alpha"] = 1.0 / tau if tau is not None else float(kw.get("alpha", 2.0) if kw.get("alpha") is not None else 2.0)
        fp["gamma"] = float(tau) if tau is not None else float(kw.get("gamma", 0.5) if kw.get("gamma") is not None else 0.5)
        fp["tau"] = None
        mr = kw.get("mask_ratio")
        fp["mask_ratio"] = float(mr) if mr is not None else 0.5
        fp["scope"] = kw.get("scope") or "tensor"
    return fp


def to_jsonable(cfg) -> Dict:
    out = {}
    for k, v in vars(cfg).items():
        if k in ("device_obj", "deepspeed_dict"):
            continue
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            out[k] = str(v)
    return out
