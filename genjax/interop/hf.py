"""Hugging Face Llama ↔ genjax: export a run's checkpoint, import one as a new run.

    python -m genjax.interop.hf export --workdir DIR --out HF_DIR
    python -m genjax.interop.hf import --hf HF_DIR --workdir DIR [--seq-len N] [--set F=V ...]

genjax's transformer is a Llama (RMSNorm, rotate-half RoPE with frequencies
``theta^(-i/half)``, SwiGLU, grouped-query attention, no biases, optionally tied
embeddings), so converting is only a matter of names and layouts: genjax stacks
its blocks on a leading L axis and keeps heads as their own axis (``wq`` is
[L, D, N, K]); Hugging Face stores one ``[out, in]`` matrix per layer
(``q_proj`` is [N·K, D]). Both use the same RoPE convention, so q and k need no
permutation (tests/test_interop_hf.py checks logits against transformers).

Export writes ``config.json``, ``model.safetensors`` (parameters in their
``param_dtype``) and the run's sentencepiece ``tokenizer.model`` with a minimal
``tokenizer_config.json``. The tokenizer is genjax's: ids 0 ``<pad>``, 1
``<unk>``, 2 ``<eod>``, bytes from 3; a document starts after ``<eod>``, which is
therefore both the BOS and the EOS id. ``transformers.AutoTokenizer`` on the
folder gives genjax's ids with that leading 2 (checked on Python source in the
tests), except around a literal "▁" (U+2581), which genjax spells as bytes;
``genjax.tokenizer.Tokenizer.load`` on the same file is exact.

Import reads ``config.json`` and safetensors only (a single file or a sharded
``model.safetensors.index.json``; never pickle, so loading runs no code from
the checkpoint) and writes a run directory: ``tokenizer.model`` and the step-0
checkpoint ``run.start`` writes (the imported parameters, a fresh optimizer
state, no data read yet), so ``experiments/lm_pretrain.py`` resumes it,
``genjax.score`` scores it and ``genjax.sampling`` samples it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from genjax import config as configlib
from genjax import lm, run
from genjax.interop import safetensors
from genjax.models import transformer
from genjax.tokenizer import EOD_ID, PAD_ID, Tokenizer

Params = dict[str, Any]

# ----------------------------------------------------------------------------- names and layouts


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """How one genjax parameter (one layer's slice of it, for blocks) is stored by HF."""

    hf: str  # Hugging Face name; "{i}" stands for the layer index
    path: tuple[str, ...]  # genjax parameter path (under "blocks" for per-layer tensors)
    # A matrix: how many leading genjax axes are its input (HF stores [out, in]).
    # None: stored in the same layout (norm scales, the [V, D] embedding).
    in_dims: int | None

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.in_dims is None:
            return shape
        return (math.prod(shape[self.in_dims :]), math.prod(shape[: self.in_dims]))

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if self.in_dims is None:
            return x
        return x.reshape(math.prod(x.shape[: self.in_dims]), -1).T

    def from_hf(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return w if self.in_dims is None else w.T.reshape(shape)


_GLOBAL = (
    _Tensor("model.embed_tokens.weight", ("embed_VD",), None),
    _Tensor("model.norm.weight", ("final_norm", "scale"), None),
    _Tensor("lm_head.weight", ("lm_head_DV",), 1),  # untied models only
)
_PER_LAYER = (
    _Tensor("model.layers.{i}.input_layernorm.weight", ("attn_norm", "scale"), None),
    _Tensor("model.layers.{i}.self_attn.q_proj.weight", ("attn", "wq_DNK"), 1),
    _Tensor("model.layers.{i}.self_attn.k_proj.weight", ("attn", "wk_DGK"), 1),
    _Tensor("model.layers.{i}.self_attn.v_proj.weight", ("attn", "wv_DGK"), 1),
    _Tensor("model.layers.{i}.self_attn.o_proj.weight", ("attn", "wo_NKD"), 2),
    _Tensor("model.layers.{i}.post_attention_layernorm.weight", ("mlp_norm", "scale"), None),
    _Tensor("model.layers.{i}.mlp.gate_proj.weight", ("mlp", "w_gate_DF"), 1),
    _Tensor("model.layers.{i}.mlp.up_proj.weight", ("mlp", "w_up_DF"), 1),
    _Tensor("model.layers.{i}.mlp.down_proj.weight", ("mlp", "w_down_FD"), 1),
)
# Non-persistent RoPE buffers some older checkpoints carry: derived from
# rope_theta, not parameters.
_IGNORED_SUFFIX = ".rotary_emb.inv_freq"


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str  # Hugging Face tensor name
    tensor: _Tensor
    path: tuple[str, ...]  # full genjax path
    layer: int | None  # index into the stacked L axis; None for global tensors
    shape: tuple[int, ...]  # genjax shape of one layer's slice (the whole array if global)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return self.tensor.hf_shape(self.shape)


def _entries(cfg: transformer.Config) -> list[_Entry]:
    """Every Hugging Face tensor of a model with this config, in checkpoint order."""
    abstract = traverse_util.flatten_dict(transformer.abstract_params(cfg))
    shapes = {path: leaf.shape for path, leaf in abstract.items()}
    entries = [
        _Entry(t.hf, t, t.path, None, shapes.pop(t.path)) for t in _GLOBAL if t.path in shapes
    ]
    for t in _PER_LAYER:
        path = ("blocks", *t.path)
        stacked = shapes.pop(path)
        entries += [
            _Entry(t.hf.format(i=i), t, path, i, stacked[1:]) for i in range(cfg.num_layers)
        ]
    if shapes:  # a parameter added to the transformer must get a name here, not vanish
        raise RuntimeError(f"genjax parameters with no Hugging Face name: {sorted(shapes)}")
    return entries


def to_hf_tensors(cfg: transformer.Config, params: Params) -> dict[str, np.ndarray]:
    """Hugging Face tensors ({name: [out, in] matrix or vector}) of genjax parameters."""
    flat = traverse_util.flatten_dict(jax.device_get(params))
    tensors = {}
    for e in _entries(cfg):
        x = np.asarray(flat[e.path])
        tensors[e.name] = e.tensor.to_hf(x if e.layer is None else x[e.layer])
    return tensors


def from_hf_tensors(cfg: transformer.Config, tensors: Mapping[str, np.ndarray]) -> Params:
    """genjax parameters (numpy, in ``cfg.param_dtype``) from Hugging Face tensors.

    Every missing, unexpected or misshapen tensor is named in one error, so a
    wrong config shows all its consequences at once.
    """
    tensors = {k: v for k, v in tensors.items() if not k.endswith(_IGNORED_SUFFIX)}
    if cfg.tie_embeddings:
        _drop_tied_head(tensors)
    entries = _entries(cfg)
    expected = {e.name for e in entries}
    problems = [f"{name}: missing" for name in sorted(expected - tensors.keys())]
    problems += [f"{name}: unexpected tensor" for name in sorted(tensors.keys() - expected)]
    for e in entries:
        w = tensors.get(e.name)
        if w is None:
            continue
        if w.shape != e.hf_shape:
            problems.append(f"{e.name}: expected shape {e.hf_shape}, got {w.shape}")
        elif safetensors.dtype_name(w.dtype) not in ("F32", "F16", "BF16"):
            problems.append(f"{e.name}: expected a float tensor, got {w.dtype}")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(
            f"the checkpoint does not fit the model of its config.json:\n  {shown}{more}"
        )
    dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    flat: dict[tuple[str, ...], Any] = {}
    for e in entries:
        x = e.tensor.from_hf(tensors[e.name], e.shape).astype(dtype)
        if e.layer is None:
            flat[e.path] = x
        else:
            flat.setdefault(e.path, []).append(x)  # layers come in order 0..L-1
    stacked = {p: np.stack(x) if isinstance(x, list) else x for p, x in flat.items()}
    return traverse_util.unflatten_dict(stacked)


def _drop_tied_head(tensors: dict[str, np.ndarray]) -> None:
    """Accepts a tied model's ``lm_head.weight`` (HF may or may not save it) if it is
    the embedding, and drops it: genjax reads the head from the embedding."""
    head = tensors.pop("lm_head.weight", None)
    embed = tensors.get("model.embed_tokens.weight")
    if head is None or embed is None:
        return
    if head.shape != embed.shape or not np.array_equal(head, embed):
        raise ValueError(
            "lm_head.weight differs from model.embed_tokens.weight, but config.json has "
            "tie_word_embeddings=true"
        )


# ----------------------------------------------------------------------------- config.json


def hf_config(cfg: transformer.Config) -> dict[str, Any]:
    """``config.json`` of ``transformers.LlamaConfig`` for a genjax model config."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        # transformers 4.x reads torch_dtype, 5.x dtype.
        "torch_dtype": cfg.param_dtype,
        "dtype": cfg.param_dtype,
        # A genjax document starts after <eod>: it is the BOS as well as the EOS token.
        "bos_token_id": EOD_ID,
        "eos_token_id": EOD_ID,
        "pad_token_id": PAD_ID,
    }


def _unsupported(hf: Mapping[str, Any]) -> list[str]:
    """What in a config.json genjax's transformer cannot compute."""
    problems = []
    if hf.get("model_type") != "llama":
        problems.append(f"model_type {hf.get('model_type')!r} (only 'llama' is supported)")
    arch = hf.get("architectures")
    if arch is not None and arch != ["LlamaForCausalLM"]:
        problems.append(f"architectures {arch} (only ['LlamaForCausalLM'] is supported)")
    if hf.get("rope_scaling") is not None:
        problems.append(f"rope_scaling {hf['rope_scaling']} (genjax has plain RoPE only)")
    rope = _rope_parameters(hf)  # transformers 5.x
    if rope.get("rope_type", "default") != "default" or set(rope) - {"rope_type", "rope_theta"}:
        problems.append(f"rope_parameters {rope} (genjax has plain RoPE only)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            problems.append(f"{key}=true (genjax's transformer has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (genjax's SwiGLU uses 'silu')")
    return problems


def _count(hf: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = hf.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"config.json: {key} is missing")
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"config.json: {key} must be an integer, got {value!r}")
    return value


def _rope_parameters(hf: Mapping[str, Any]) -> dict:
    rope = hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"config.json: rope_parameters must be an object, got {rope!r}")
    return rope


def _positive(value: Any, key: str) -> float:
    """A number a config.json key must hold: finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"config.json: {key} must be a positive number, got {value!r}")
    return float(value)


def _flag(hf: Mapping[str, Any], key: str) -> bool:
    value = hf.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"config.json: {key} must be true or false, got {value!r}")
    return value


def model_config(hf: Mapping[str, Any]) -> transformer.Config:
    """The genjax model config of a Llama ``config.json`` (HF's defaults where a key is
    absent); genjax-only fields (attention block, compute dtype, scan) keep their defaults."""
    problems = _unsupported(hf)
    if problems:
        raise ValueError(f"config.json: unsupported model: {'; '.join(problems)}")
    num_heads, d_model = _count(hf, "num_attention_heads"), _count(hf, "hidden_size")
    rope = _rope_parameters(hf)
    return transformer.Config(
        vocab_size=_count(hf, "vocab_size"),
        d_model=d_model,
        num_layers=_count(hf, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=_count(hf, "num_key_value_heads", num_heads),
        head_dim=_count(hf, "head_dim", d_model // max(num_heads, 1)),
        ffn_dim=_count(hf, "intermediate_size"),
        max_seq_len=_count(hf, "max_position_embeddings"),
        rope_theta=_positive(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)), "rope_theta"),
        norm_eps=_positive(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
        tie_embeddings=_flag(hf, "tie_word_embeddings"),
    )


def _param_dtype(tensors: Mapping[str, np.ndarray]) -> str:
    """The checkpoint's own float dtype when all tensors share one (so a round trip is
    exact), else float32 (every supported float type widens to it exactly). Old
    checkpoints' float32 RoPE buffers are dropped on import, and do not count."""
    names = {
        safetensors.dtype_name(t.dtype)
        for name, t in tensors.items()
        if not name.endswith(_IGNORED_SUFFIX)
    }
    return {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(
        names.pop() if len(names) == 1 else "", "float32"
    )


# ----------------------------------------------------------------------------- folders

_SPECIAL_TOKENS = {
    "bos_token": "<eod>",
    "eos_token": "<eod>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
}


def _write_json(path: pathlib.Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def write_hf(
    out_dir: str | pathlib.Path,
    cfg: transformer.Config,
    params: Params,
    *,
    tokenizer_path: str | pathlib.Path | None = None,
) -> None:
    """A folder ``transformers.LlamaForCausalLM.from_pretrained`` loads."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    safetensors.save(out / "model.safetensors", to_hf_tensors(cfg, params))
    _write_json(out / "config.json", hf_config(cfg))
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, out / "tokenizer.model")
        _write_json(out / "special_tokens_map.json", _SPECIAL_TOKENS)
        _write_json(
            out / "tokenizer_config.json",
            {
                "tokenizer_class": "LlamaTokenizer",
                "model_max_length": cfg.max_seq_len,
                # genjax conditions a document on a leading <eod>; see the module docstring.
                "add_bos_token": True,
                "add_eos_token": False,
                # genjax's sentencepiece settings: no dummy "▁" before the text.
                "add_prefix_space": False,
                "legacy": False,
                # "<eod>" written in a text is text to genjax, not the special token.
                "split_special_tokens": True,
                **_SPECIAL_TOKENS,
            },
        )


def read_hf_config(hf_dir: str | pathlib.Path) -> dict[str, Any]:
    path = pathlib.Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a Hugging Face model folder")
    try:
        hf = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return hf


def read_hf_tensors(hf_dir: str | pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of ``model.safetensors``, or of the shards listed in
    ``model.safetensors.index.json``. Pickle-based ``.bin`` files are refused."""
    hf_dir = pathlib.Path(hf_dir)
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        return safetensors.load(single)
    if index.is_file():
        return _read_shards(index)
    pickles = sorted(p.name for p in hf_dir.glob("*.bin"))
    hint = (
        f" ({', '.join(pickles)} is pickle, which can run code when loaded and is not read; "
        "re-save with save_pretrained(..., safe_serialization=True))"
        if pickles
        else ""
    )
    raise FileNotFoundError(
        f"no model.safetensors or model.safetensors.index.json in {hf_dir}{hint}"
    )


def _read_shards(index: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
        raise ValueError(f"{index}: weight_map must map tensor names to shard file names")
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        # Never read outside the folder ("..", "sub/x", "" are not a file's name in it).
        if shard in ("", ".", "..") or pathlib.PurePath(shard).name != shard:
            raise ValueError(f"{index}: shard {shard!r} is not a file name in the folder")
        for name, tensor in safetensors.load(index.parent / shard).items():
            if name in tensors:
                raise ValueError(f"{index}: tensor {name} appears in more than one shard")
            tensors[name] = tensor
    return tensors


def read_hf(hf_dir: str | pathlib.Path) -> tuple[transformer.Config, Params]:
    """(model config, params) of a Hugging Face Llama folder, in the checkpoint's dtype."""
    cfg = model_config(read_hf_config(hf_dir))
    tensors = read_hf_tensors(hf_dir)
    cfg = dataclasses.replace(cfg, param_dtype=_param_dtype(tensors))
    return cfg, from_hf_tensors(cfg, tensors)


# ----------------------------------------------------------------------------- runs


def export_run(workdir: str | pathlib.Path, out_dir: str | pathlib.Path) -> int:
    """Writes the newest checkpoint of a language-model run as a Hugging Face folder;
    returns its step."""
    loaded = lm.load(workdir)
    write_hf(out_dir, loaded.cfg.model, loaded.params, tokenizer_path=loaded.tokenizer.model_path)
    return loaded.step


def import_run(
    hf_dir: str | pathlib.Path,
    workdir: str | pathlib.Path,
    *,
    seq_len: int | None = None,
    overrides: Sequence[str] = (),
) -> lm.PretrainConfig:
    """Writes a Hugging Face Llama folder as a genjax run (step 0) in a fresh ``workdir``.

    Everything is checked (config, tensors, tokenizer, the run config against the
    mesh) before anything is written. ``overrides`` are ``--set`` assignments
    applied to the run config (e.g. ``data.corpus=...`` for the data to train on).
    """
    hf_dir, workdir = pathlib.Path(hf_dir), pathlib.Path(workdir)
    model = model_config(read_hf_config(hf_dir))
    tensors = read_hf_tensors(hf_dir)
    model = dataclasses.replace(model, param_dtype=_param_dtype(tensors))
    data = lm.DataConfig(seq_len=seq_len or min(256, model.max_seq_len))
    base = lm.FAMILY.preset(lm.FAMILY.default_preset)
    cfg = configlib.override(dataclasses.replace(base, model=model, data=data), overrides)
    params = from_hf_tensors(cfg.model, tensors)
    tokenizer = _load_tokenizer(hf_dir / "tokenizer.model", cfg.model.vocab_size)
    if (workdir / "tokenizer.model").exists():
        raise ValueError(f"--workdir {workdir} already holds a run; import into a fresh directory")
    run.start(cfg, workdir, lm.FAMILY, params)  # checks the config on its mesh first
    (workdir / "tokenizer.model").write_bytes(tokenizer.model_proto)
    return cfg


def _load_tokenizer(path: pathlib.Path, vocab_size: int) -> Tokenizer:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a genjax run needs the model's sentencepiece tokenizer "
            "(one trained by genjax) next to its weights"
        )
    tok = Tokenizer.load(path)  # refuses a sentencepiece model that is not genjax's
    if tok.vocab_size != vocab_size:
        raise ValueError(
            f"{path} has {tok.vocab_size} pieces but config.json has vocab_size={vocab_size}; "
            "genjax needs them equal"
        )
    return tok


def resume_flags(cfg: lm.PretrainConfig) -> list[str]:
    """``--set`` assignments that give ``experiments/lm_pretrain.py`` (its default
    preset) this run's model and data config, which resuming compares. The row
    length is always given: unset, it would follow the model's context."""
    default = lm.FAMILY.preset(lm.FAMILY.default_preset)
    flags = []
    for section in ("model", "data"):
        current, base = getattr(cfg, section), getattr(default, section)
        for field in dataclasses.fields(current):
            value = getattr(current, field.name)
            if value != getattr(base, field.name) or f"{section}.{field.name}" == "data.seq_len":
                flags.append(f"{section}.{field.name}={value!r}")
    return flags


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m genjax.interop.hf",
        description="Hugging Face Llama export/import of genjax language-model runs.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="newest checkpoint of a run -> Hugging Face folder")
    exp.add_argument("--workdir", required=True, help="run directory (experiments/lm_pretrain.py)")
    exp.add_argument("--out", required=True, help="folder to write (created if needed)")
    imp = sub.add_parser("import", help="Hugging Face Llama folder -> fresh genjax run")
    imp.add_argument("--hf", required=True, help="folder with config.json, safetensors, tokenizer")
    imp.add_argument("--workdir", required=True, help="run directory to create")
    imp.add_argument("--seq-len", type=int, help="training row length (default min(256, context))")
    configlib.add_set_flag(
        imp, "override run config fields, e.g. data.corpus=\"('src/',)\" optim.lr=1e-4"
    )
    args = p.parse_args(argv)
    try:
        with run.one_line_warnings():
            if args.command == "export":
                step = export_run(args.workdir, args.out)
                print(f"exported step {step} of {args.workdir} to {args.out}")
                return 0
            cfg = import_run(args.hf, args.workdir, seq_len=args.seq_len, overrides=args.set)
    except run.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = shlex.quote(args.workdir)
    flags = resume_flags(cfg)
    print(f"imported {args.hf} into {args.workdir} as step 0")
    print("train it with (keep the model.* and data.* flags; --steps, optim.* are free):")
    set_flags = f" --set {shlex.join(flags)}" if flags else ""
    print(f"  python experiments/lm_pretrain.py --workdir {workdir}{set_flags}")
    print(f"score it with:\n  python -m genjax.score --workdir {workdir} FILE...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
