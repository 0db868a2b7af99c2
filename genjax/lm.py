"""The language-model family: pre-training on text, on the shared run layer.

corpus files → sentencepiece → packed rows → grain iterator (per process) → the
run layer (global sharded batches, the jitted step, checkpoints, logs);
validation and ``genjax.score`` report bits per byte. ``FAMILY`` is what
``experiments/lm_pretrain.py`` hands to ``run.main``; ``load`` reads a run back
for scoring, sampling and export.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from genjax import evaluate as evallib
from genjax import mesh as meshlib
from genjax import run, train
from genjax.data import corpus as corpuslib
from genjax.data import text as textlib
from genjax.models import transformer
from genjax.sampling import SamplingParams, generate_text
from genjax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class DataConfig:
    corpus: tuple[str, ...] = ()  # files or folders of text; empty = this Python's stdlib
    val_fraction: float = 0.02  # share of modules held out for validation
    seq_len: int = 256  # tokens per training row; unless set, 256 or the model's context if shorter
    global_batch_size: int = 16  # rows per optimizer step, summed over processes
    seed: int = 0  # shuffle seed

    def __post_init__(self):
        if self.seq_len < 1 or self.global_batch_size < 1:
            raise ValueError("data config: seq_len and global_batch_size must be positive")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data config: val_fraction={self.val_fraction} must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """The samples printed at the end of a run: greedy, and drawn at temperature
    with top-p (greedy decoding of a small model tends to loop)."""

    prompt: str = "def fibonacci(n):\n"
    tokens: int = 120  # new tokens per sample (at most half the context); 0 = none
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self):
        if self.tokens < 0:
            raise ValueError(f"sample config: tokens={self.tokens} must be >= 0 (0 = no samples)")
        SamplingParams(temperature=self.temperature, top_p=self.top_p)  # checks both


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    model: transformer.Config = dataclasses.field(default_factory=transformer.Config)
    optim: train.OptimConfig = dataclasses.field(default_factory=train.OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    run: run.RunConfig = dataclasses.field(default_factory=run.RunConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)


def complete(cfg: PretrainConfig, explicit: frozenset[str]) -> PretrainConfig:
    """Fields that follow others unless set: rows of 256 tokens, fewer where the
    model's context is shorter (tiny's 64), and a schedule that spans the run
    (warm-up at most a tenth of it)."""
    if "data.seq_len" not in explicit:
        seq_len = min(DataConfig.seq_len, cfg.model.max_seq_len)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=seq_len))
    return run.schedule_follows_run(cfg, explicit)


# Presets are whole experiments; ``run.configure`` fills their derived fields.
# Peak LR 1e-3: at 400 steps cpu-small reached 1.750 validation bits/byte against
# 1.871 at 3e-4 (experiments/benchmarks/RESULTS.md). tiny is a smoke run of
# seconds, also on the whole standard library.
PRESETS = {
    name: PretrainConfig(
        model=model,
        optim=train.OptimConfig(lr=1e-3),
        run=run.RunConfig(steps=100, checkpoint_every=50) if name == "tiny" else run.RunConfig(),
    )
    for name, model in transformer.PRESETS.items()
}


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


# ----------------------------------------------------------------------------- scoring


@functools.lru_cache(maxsize=8)
def nll_sums_fn(cfg: transformer.Config):
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
    sums = evallib.evaluate(nll_sums_fn(cfg), params, scoring.batches)
    bits = sums["nll"] / math.log(2)
    return {
        "bits_per_byte": bits / max(scoring.n_bytes, 1),
        "bits": bits,
        "bytes": scoring.n_bytes,
        "tokens": sums["tokens"],
    }


# ----------------------------------------------------------------------------- the family


def make_optimizer(cfg: PretrainConfig):
    mask = transformer.decay_mask(cfg.model)
    return train.make_optimizer(cfg.optim, decay_mask=lambda _: mask)


def init_from_params(cfg: PretrainConfig, params, key: jax.Array) -> train.TrainState:
    rng = jax.random.key_data(jax.random.fold_in(key, 1))
    return train.TrainState(jnp.zeros((), jnp.int32), params, make_optimizer(cfg).init(params), rng)


def init(cfg: PretrainConfig, key: jax.Array) -> train.TrainState:
    return init_from_params(cfg, transformer.init(cfg.model, jax.random.fold_in(key, 0)), key)


def make_step(cfg: PretrainConfig):
    def loss_fn(params, batch, *, key):
        del key  # no dropout in this model
        return transformer.loss(cfg.model, params, batch)

    # A mean over the unmasked targets, as many in every micro-batch of packed rows
    # but not of SFT's padded prompt–response rows.
    return train.make_train_step(loss_fn, make_optimizer(cfg), cfg.optim, weight="tokens")


def check(cfg: PretrainConfig, mesh) -> None:
    """What can be wrong with an LM config on a mesh, before any compile."""
    meshlib.check_batch_size(cfg.data.global_batch_size, mesh)
    meshlib.check_process_batch_layout(cfg.data.global_batch_size, mesh)
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ValueError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}"
        )
    train.check_micro_batches(cfg.optim.grad_accum, cfg.data.global_batch_size, mesh)


def data(cfg: PretrainConfig, workdir: pathlib.Path) -> run.Data:
    """Corpus → tokenizer (trained once) → packed rows (cached) → this process's
    iterator; validation bits per byte and the closing samples."""
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

    def evaluate(state: train.TrainState) -> dict[str, float]:
        return {
            "val_bits_per_byte": bits_per_byte(cfg.model, state.params, validation)["bits_per_byte"]
        }

    def finish(state: train.TrainState, metrics: dict[str, float]) -> None:
        if "val_bits_per_byte" in metrics:
            print(f"validation bits/byte: {metrics['val_bits_per_byte']:.4f}")
        if cfg.sample.tokens and jax.process_count() == 1:
            print_samples(cfg, state.params, tok)

    return run.Data(
        batches=iterator,
        evaluate=evaluate if validation else None,
        finish=finish,
        describe=f"{len(rows):,} training rows of {cfg.data.seq_len} tokens",
        throughput=("tokens", cfg.data.global_batch_size * cfg.data.seq_len),
    )


def print_samples(cfg: PretrainConfig, params, tok: Tokenizer) -> None:
    """The closing samples: greedy, then at temperature with top-p."""
    s, context = cfg.sample, cfg.model.max_seq_len
    prompt_tokens = 1 + len(tok.encode(s.prompt))  # after the end-of-document token
    max_new = min(s.tokens, context // 2, context - prompt_tokens)
    if max_new < 1:
        print(f"no sample: the prompt's {prompt_tokens} tokens fill the {context}-token context")
        return
    drawn = SamplingParams(temperature=s.temperature, top_p=s.top_p)
    for title, sampling in [
        ("greedy", SamplingParams()),
        (f"temperature {s.temperature}, top-p {s.top_p}", drawn),
    ]:
        [text] = generate_text(
            cfg.model,
            params,
            tok,
            [s.prompt],
            max_new_tokens=max_new,
            sampling=sampling,
            seed=s.seed,
        )
        print(f"sample ({title}):\n{s.prompt}{text}")


def _add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--corpus", nargs="+", help="files or folders to train on (default: Python stdlib)"
    )
    p.add_argument("--sample-tokens", type=int, help="tokens of each closing sample (0: none)")


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    flags = []
    if args.corpus:
        flags.append(f"data.corpus={tuple(args.corpus)!r}")
    if args.sample_tokens is not None:
        flags.append(f"sample.tokens={args.sample_tokens}")
    return flags


FAMILY = run.Family(
    name="lm",
    presets=PRESETS,
    default_preset="cpu-small",
    init=init,
    init_from_params=init_from_params,
    param_axes=lambda cfg: {"params": transformer.param_axes(cfg.model)},
    rules=transformer.RULES,
    step=make_step,
    data=data,
    check=check,
    complete=complete,
    add_flags=_add_flags,
    flag_overrides=_flag_overrides,
)


@dataclasses.dataclass
class Loaded:
    cfg: PretrainConfig
    params: dict  # the newest checkpoint's parameters, replicated over this process's devices
    tokenizer: Tokenizer
    step: int


def load(workdir: str | pathlib.Path) -> Loaded:
    """The newest checkpoint of an LM run, for scoring, sampling and export."""
    loaded = run.load(workdir, FAMILY)
    tok = Tokenizer.load(pathlib.Path(workdir) / "tokenizer.model")
    return Loaded(loaded.cfg, loaded.state.params, tok, loaded.step)
