"""Language-model pre-training, wired from the shared parts.

corpus files → sentencepiece → packed rows → grain iterator (per process)
→ global sharded batches → jitted step → orbax checkpoints; validation and
``genjax.score`` report bits per byte.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from genjax import config as configlib
from genjax import evaluate as evallib
from genjax import mesh as meshlib
from genjax import train
from genjax.checkpoint import Checkpointer
from genjax.data import corpus as corpuslib
from genjax.data import text as textlib
from genjax.metrics_log import MetricsLogger
from genjax.models import transformer
from genjax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class DataConfig:
    corpus: tuple[str, ...] = ()  # files or folders of text; empty = this Python's stdlib
    val_fraction: float = 0.02  # share of modules held out for validation
    seq_len: int = 256  # tokens per training row (the model's context)
    global_batch_size: int = 16  # rows per optimizer step, summed over processes
    seed: int = 0  # shuffle seed

    def __post_init__(self):
        if self.seq_len < 1 or self.global_batch_size < 1:
            raise ValueError("data config: seq_len and global_batch_size must be positive")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data config: val_fraction={self.val_fraction} must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    steps: int = 400  # optimizer steps in total (a resumed run continues to this)
    checkpoint_every: int = 50  # steps between checkpoints
    keep_checkpoints: int = 3  # newest checkpoints kept on disk
    log_every: int = 10  # steps between metrics.jsonl records
    eval_every: int = 0  # steps between validation passes; 0 = only at the end
    mesh: str = "data=-1"  # device mesh, e.g. "data=2,fsdp=2,tensor=2"
    seed: int = 0  # parameter init and per-step RNG

    def __post_init__(self):
        for name in ("steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"run config: {name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"run config: eval_every must be >= 0, got {self.eval_every}")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    model: transformer.Config = dataclasses.field(default_factory=transformer.Config)
    optim: train.OptimConfig = dataclasses.field(default_factory=train.OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)


# ----------------------------------------------------------------------------- data


def corpus_split(data: DataConfig) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
    """Train and validation files, split by module so no module sits on both sides."""
    if data.corpus:
        files = corpuslib.expand_paths(data.corpus)
        if not files:
            raise ValueError(
                f"corpus is empty: {', '.join(data.corpus)} holds no .py or .txt files; "
                f"pass --corpus with files or folders of text"
            )
        root = None
    else:
        root = corpuslib.stdlib_root()
        files = corpuslib.stdlib_files(root)
    if data.val_fraction == 0:
        return files, []
    try:
        return corpuslib.split_by_module(files, val_fraction=data.val_fraction, root=root)
    except ValueError as e:
        raise ValueError(
            f"{e}. To train without validation, pass --set data.val_fraction=0"
        ) from None


def load_or_train_tokenizer(
    workdir: pathlib.Path, files: Sequence[pathlib.Path], vocab_size: int
) -> Tokenizer:
    """The run's tokenizer: trained once on the training files, then reloaded."""
    path = workdir / "tokenizer.model"
    if path.exists():
        tok = Tokenizer.load(path)
        if tok.vocab_size != vocab_size:
            raise ValueError(
                f"{path} has vocabulary {tok.vocab_size} but the model expects {vocab_size}; "
                f"use a fresh --workdir or set model.vocab_size={tok.vocab_size}"
            )
    else:
        tok = None
    if tok is None and jax.process_index() == 0:
        texts = (t for _, t in corpuslib.read_texts(files))
        Tokenizer.train(texts, vocab_size=vocab_size, model_path=path)
    _sync("tokenizer")  # every process passes here, whichever branch it took
    return tok if tok is not None else Tokenizer.load(path)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def global_batches(local_iter: Iterator[dict], mesh) -> Iterator[dict[str, jax.Array]]:
    for local in local_iter:
        yield meshlib.global_batch(local, mesh)


# ----------------------------------------------------------------------------- scoring


@functools.lru_cache(maxsize=8)
def _nll_sums_fn(cfg: transformer.Config):
    # One function object per config, so evaluate's compile cache hits on every pass.
    return functools.partial(transformer.nll_sums, cfg)


@dataclasses.dataclass(frozen=True)
class ScoringSet:
    """Texts prepared for bits-per-byte scoring: tokenized once, scored many times."""

    batches: tuple[dict[str, np.ndarray], ...]  # {"tokens": [B, L+1], "mask": [B, L]}
    n_bytes: int  # UTF-8 bytes of the texts


def scoring_set(
    tok: Tokenizer, texts: Sequence[str], *, seq_len: int, batch_size: int = 16
) -> ScoringSet:
    """Every token of every text predicted once (see ``data.document_rows``), in
    batches of one shape (padding rows masked) so scoring compiles once."""
    docs = tok.encode_batch(list(texts))
    rows, masks = zip(*(textlib.document_rows(d, seq_len, tok.eos_id) for d in docs), strict=True)
    rows, masks = np.concatenate(rows), np.concatenate(masks)
    pad = -len(rows) % batch_size
    rows = np.concatenate([rows, np.full((pad, rows.shape[1]), tok.eos_id, np.int32)])
    masks = np.concatenate([masks, np.zeros((pad, masks.shape[1]), np.float32)])
    batches = tuple(
        {"tokens": rows[i : i + batch_size], "mask": masks[i : i + batch_size]}
        for i in range(0, len(rows), batch_size)
    )
    return ScoringSet(batches, sum(len(t.encode("utf-8")) for t in texts))


def bits_per_byte(cfg: transformer.Config, params, scoring: ScoringSet) -> dict[str, float]:
    """Total negative log2-likelihood of the tokens ÷ UTF-8 bytes, evaluated
    across all local devices."""
    sums = evallib.evaluate(_nll_sums_fn(cfg), params, scoring.batches)
    bits = sums["nll"] / math.log(2)
    return {
        "bits_per_byte": bits / max(scoring.n_bytes, 1),
        "bits": bits,
        "bytes": scoring.n_bytes,
        "tokens": sums["tokens"],
    }


# ----------------------------------------------------------------------------- run


def _lm_loss(cfg: transformer.Config):
    def loss_fn(params, batch, *, key):
        del key  # no dropout in this model
        return transformer.loss(cfg, params, batch)

    return loss_fn


def make_optimizer(cfg: PretrainConfig):
    mask = transformer.decay_mask(cfg.model)
    return train.make_optimizer(cfg.optim, decay_mask=lambda _: mask)


def build_state(cfg: PretrainConfig, mesh):
    """Optimizer, sharded train state and the jitted step for this config."""
    optimizer = make_optimizer(cfg)
    state, shardings = train.create_train_state(
        lambda key: transformer.init(cfg.model, key),
        transformer.param_axes(cfg.model),
        optimizer,
        mesh,
        seed=cfg.run.seed,
    )
    step_fn = train.make_train_step(_lm_loss(cfg.model), optimizer, cfg.optim)
    return state, shardings, train.jit_train_step(step_fn, shardings, mesh)


def validate(cfg: PretrainConfig, mesh) -> None:
    """Everything that can be wrong with a config, checked before any compile."""
    meshlib.check_batch_size(cfg.data.global_batch_size, mesh)
    meshlib.check_process_batch_layout(cfg.data.global_batch_size, mesh)
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ValueError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}"
        )
    local = cfg.data.global_batch_size // jax.process_count()
    per_device = cfg.data.global_batch_size // meshlib.data_parallel_size(mesh)
    if per_device % cfg.optim.grad_accum:
        raise ValueError(
            f"optim.grad_accum={cfg.optim.grad_accum} does not divide the per-device batch "
            f"{per_device} (global {cfg.data.global_batch_size}, {local} per process)"
        )
    meshlib.tree_shardings(
        transformer.param_axes(cfg.model), transformer.abstract_params(cfg.model), mesh
    )


@dataclasses.dataclass
class PreparedData:
    tokenizer: Tokenizer
    rows: np.ndarray  # packed training rows [N, seq_len + 1]
    train_iterator: Any  # grain DatasetIterator of this process's batches (checkpointed)
    validation: ScoringSet | None


def prepare_data(cfg: PretrainConfig, workdir: pathlib.Path) -> PreparedData:
    """Corpus → tokenizer (trained once) → packed rows (cached) → this process's iterator."""
    train_files, val_files = corpus_split(cfg.data)
    tok = load_or_train_tokenizer(workdir, train_files, cfg.model.vocab_size)
    tokens = textlib.prepare_corpus(tok, train_files, cache_dir=workdir / "data")
    rows = textlib.pack(tokens, cfg.data.seq_len)
    iterator = textlib.make_train_iterator(
        rows,
        global_batch_size=cfg.data.global_batch_size,
        seed=cfg.data.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    val_texts = [t for _, t in corpuslib.read_texts(val_files)] if val_files else []
    validation = scoring_set(tok, val_texts, seq_len=cfg.data.seq_len) if val_texts else None
    return PreparedData(tok, rows, iterator, validation)


def make_checkpointer(cfg: PretrainConfig, workdir: pathlib.Path) -> Checkpointer:
    """The run's checkpointer; everything that writes a run's checkpoints uses it."""
    return Checkpointer(
        workdir / "checkpoints",
        config=configlib.to_dict(cfg),
        keep=cfg.run.keep_checkpoints,
        save_every=cfg.run.checkpoint_every,
        # A resumed iterator is only meaningful over the same data pipeline.
        compare_keys=("model", "data"),
    )


def pretrain(cfg: PretrainConfig, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Trains (or resumes) a language model in ``workdir``; returns final metrics."""
    workdir = pathlib.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir {workdir} exists and is not a directory")
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = meshlib.make_mesh(cfg.run.mesh)
    validate(cfg, mesh)
    checkpointer = make_checkpointer(cfg, workdir)
    try:
        checkpointer.check_config()  # refuse another run's checkpoints before any work
        return _pretrain(cfg, workdir, mesh, checkpointer)
    finally:
        checkpointer.close()  # an in-flight async save completes even on error


def _pretrain(cfg: PretrainConfig, workdir: pathlib.Path, mesh, checkpointer) -> dict[str, Any]:
    t0 = time.perf_counter()
    data = prepare_data(cfg, workdir)
    prep_s = time.perf_counter() - t0

    state, shardings, step_fn = build_state(cfg, mesh)
    abstract = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state, shardings
    )
    restored = checkpointer.restore(abstract, data.train_iterator)
    if restored is not None:
        state, step = restored
        print(f"resumed from step {step} in {checkpointer.directory}", flush=True)

    def eval_fn(s: train.TrainState) -> dict[str, float]:
        return {
            "val_bits_per_byte": bits_per_byte(cfg.model, s.params, data.validation)[
                "bits_per_byte"
            ]
        }

    with MetricsLogger(
        workdir, total_steps=cfg.run.steps, start_step=int(jax.device_get(state.step))
    ) as logger:
        logger.write(
            f"{transformer.count_params(cfg.model)['total']:,} parameters · mesh "
            f"{dict(mesh.shape)} · {len(data.rows):,} training rows of {cfg.data.seq_len} "
            f"tokens · data prepared in {prep_s:.1f}s"
        )
        result = train.fit(
            state,
            step_fn,
            global_batches(data.train_iterator, mesh),
            num_steps=cfg.run.steps,
            checkpointer=checkpointer,
            data_iterator=data.train_iterator,
            logger=logger,
            log_every=cfg.run.log_every,
            tokens_per_step=cfg.data.global_batch_size * cfg.data.seq_len,
            eval_fn=eval_fn if (data.validation and cfg.run.eval_every) else None,
            eval_every=cfg.run.eval_every,
        )
        summary: dict[str, Any] = {
            "step": int(jax.device_get(result.state.step)),
            "stopped_by": result.stopped_by_signal,
            "state": result.state,
            "tokenizer": data.tokenizer,
        }
        if result.stopped_by_signal is None and data.validation:
            summary.update(eval_fn(result.state))
            logger.log(summary["step"], {"val_bits_per_byte": summary["val_bits_per_byte"]})
    return summary


def load_for_scoring(workdir: str | pathlib.Path):
    """(model config, params, tokenizer, seq_len, step) from the newest checkpoint."""
    workdir = pathlib.Path(workdir)
    ckpt_dir = workdir / "checkpoints"
    saved = None
    if ckpt_dir.is_dir():
        with Checkpointer(ckpt_dir, config={}, compare_keys=()) as probe:
            saved = probe.saved_config()
    if saved is None:
        raise FileNotFoundError(
            f"no checkpoint in {ckpt_dir}; train first with experiments/lm_pretrain.py"
        )
    cfg = configlib.from_dict(PretrainConfig, saved)
    abstract, _ = train.abstract_train_state(
        lambda key: transformer.init(cfg.model, key),
        transformer.param_axes(cfg.model),
        make_optimizer(cfg),
        meshlib.make_mesh("data=-1"),
    )
    with Checkpointer(ckpt_dir, config=saved) as checkpointer:
        state, step = checkpointer.restore(abstract)
    tok = Tokenizer.load(workdir / "tokenizer.model")
    return cfg.model, state.params, tok, cfg.data.seq_len, step
