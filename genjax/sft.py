"""Supervised fine-tuning of a language model on prompt–response pairs, on the shared
run layer.

base LM run (its newest checkpoint, config and tokenizer) → JSON lines {"prompt",
"response"} (``genjax.rl.data``) → one padded row per pair → grain iterator (per
process) → the run layer, starting from the base's weights with fresh AdamW moments →
validation loss on the held-out pairs' responses → a greedy answer to held-out prompts.

A row is ``<eod> prompt response <eod>``, then padding: the loss counts only the
targets of the response and its closing ``<eod>`` (the model learns to answer and to
stop), never the prompt or the padding (``<pad>``, id 0, distinct from the end of a
response). A pair longer than a row keeps its first ``seq_len + 1`` tokens; a pair whose
prompt alone fills the row teaches nothing and is dropped, and counted.

``experiments/sft.py`` is the command; ``FAMILY`` is what it hands to ``run.main``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil

import jax

from genjax import evaluate as evallib
from genjax import lm, run, train
from genjax.data.rows import row_batches
from genjax.models import transformer
from genjax.rl import data as rldata
from genjax.sampling import generate_text
from genjax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = ""  # JSON lines {"prompt": str, "response": str}
    val_fraction: float = 0.1  # share of pairs held out (by a hash of the prompt)
    seq_len: int = 128  # tokens per row: <eod> prompt response <eod> and padding
    global_batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.seq_len < 2 or self.global_batch_size < 1:
            raise ValueError("sft data config: seq_len >= 2 and global_batch_size >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"sft data config: val_fraction={self.val_fraction} not in [0, 1)")


@dataclasses.dataclass(frozen=True)
class Config:
    base: str = ""  # the LM run (its workdir) whose newest checkpoint is fine-tuned
    model: transformer.Config = dataclasses.field(default_factory=transformer.Config)
    optim: train.OptimConfig = dataclasses.field(
        default_factory=lambda: train.OptimConfig(lr=1e-4, warmup_steps=10)
    )
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    run: run.RunConfig = dataclasses.field(
        default_factory=lambda: run.RunConfig(steps=200, checkpoint_every=100, eval_every=100)
    )


PRESETS = {
    "default": Config(),
    "tiny": Config(
        data=DataConfig(seq_len=32, global_batch_size=8),
        run=run.RunConfig(steps=6, checkpoint_every=3, eval_every=3, log_every=1),
    ),
}


def complete(cfg: Config, explicit: frozenset[str]) -> Config:
    return with_base_model(cfg, explicit, "sft", "the prompt–response pairs")


def with_base_model(cfg, explicit: frozenset[str], who: str, data_what: str):
    """``cfg`` (any fine-tuning family's: ``base``, ``data.path``, ``data.seq_len``,
    ``model``) with the base run's model and a schedule that spans the run."""
    if not cfg.base:
        raise ValueError(f"{who}: give the LM run to start from, --base LM_WORKDIR")
    if not cfg.data.path:
        raise ValueError(f"{who}: give {data_what}, --data PATH.jsonl")
    set_model = sorted(name for name in explicit if name.startswith("model."))
    if set_model:
        raise ValueError(f"{who}: the model is the base run's; do not set {', '.join(set_model)}")
    model = base_model(cfg.base)
    if cfg.data.seq_len > model.max_seq_len:
        raise ValueError(
            f"data.seq_len={cfg.data.seq_len} exceeds the base model's context "
            f"{model.max_seq_len}; lower it with --set data.seq_len=N"
        )
    return run.schedule_follows_run(dataclasses.replace(cfg, model=model), explicit)


# ----------------------------------------------------------------------------- the family


def base_family(workdir: str | pathlib.Path) -> run.Family:
    """The family of an LM run: pre-trained (``lm``) or fine-tuned (``sft``)."""
    return FAMILY if "base" in run.saved_dict(workdir) else lm.FAMILY


def base_model(workdir: str | pathlib.Path) -> transformer.Config:
    """The model config of an LM run, pre-trained or fine-tuned."""
    return run.saved_config(workdir, base_family(workdir)).model


def base_tokenizer(workdir: str | pathlib.Path, model: transformer.Config) -> Tokenizer:
    """An LM run's tokenizer, checked against its model."""
    path = pathlib.Path(workdir) / "tokenizer.model"
    if not path.is_file():
        raise ValueError(f"{path}: missing; {workdir} is not a language-model run")
    tok = Tokenizer.load(path)
    if tok.vocab_size != model.vocab_size:
        raise ValueError(
            f"{path} has {tok.vocab_size} pieces, the model {model.vocab_size}: not the "
            f"tokenizer this model was trained with"
        )
    return tok


def copy_base_tokenizer(base: str | pathlib.Path, model: transformer.Config, workdir) -> Tokenizer:
    """The base run's tokenizer, copied into ``workdir`` (None: not copied) so that the new
    run samples and serves on its own."""
    tok = base_tokenizer(base, model)
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tok.model_path, workdir / "tokenizer.model")
    return tok


def load_base(workdir: str | pathlib.Path):
    """The newest weights of an LM run, pre-trained or fine-tuned."""
    return run.load(workdir, base_family(workdir)).state.params


def base_params(cfg: Config):
    return load_base(cfg.base)


def response_loss(cfg: Config, params, batches) -> float:
    """Mean NLL (nats) per response token of the validation batches."""
    sums = evallib.evaluate(lm.nll_sums_fn(cfg.model), params, batches)
    return sums["nll"] / max(sums["tokens"], 1.0)


def data(cfg: Config, workdir: pathlib.Path) -> run.Data:
    tok = copy_base_tokenizer(cfg.base, cfg.model, workdir)
    train_pairs, val_pairs = rldata.split(rldata.read_sft(cfg.data.path), cfg.data.val_fraction)
    tokens, mask, dropped = rldata.pair_rows(tok, train_pairs, cfg.data.seq_len)
    if len(tokens) < cfg.data.global_batch_size:
        raise ValueError(
            f"{cfg.data.path}: {len(tokens)} training pairs fit a row of {cfg.data.seq_len} "
            f"tokens ({dropped} dropped: the prompt fills the row), fewer than a batch of "
            f"{cfg.data.global_batch_size}; add pairs or lower data.global_batch_size"
        )
    batches = row_batches({"tokens": tokens, "mask": mask}, cfg.data.global_batch_size,
                          seed=cfg.data.seed)  # fmt: skip
    val_tokens, val_mask, _ = rldata.pair_rows(tok, val_pairs, cfg.data.seq_len)
    val_batches = tuple(
        {"tokens": val_tokens[i : i + 16], "mask": val_mask[i : i + 16]}
        for i in range(0, len(val_tokens), 16)
    )

    def evaluate(state: train.TrainState) -> dict[str, float]:
        return {"val_response_nll": response_loss(cfg, state.params, val_batches)}

    def finish(state: train.TrainState, metrics: dict[str, float]) -> None:
        if "val_response_nll" in metrics:
            print(f"validation loss per response token: {metrics['val_response_nll']:.4f} nats")
        if not val_pairs or jax.process_count() > 1:
            return
        # Two held-out prompts with room for an answer of at least 16 tokens.
        room = {p["prompt"]: cfg.model.max_seq_len - 1 - len(tok.encode(p["prompt"]))
                for p in val_pairs}  # fmt: skip
        prompts = [p for p, r in room.items() if r >= 16][:2]
        if not prompts:
            return
        max_new = min(64, *(room[p] for p in prompts))
        answers = generate_text(cfg.model, state.params, tok, prompts, max_new_tokens=max_new)
        for prompt, answer in zip(prompts, answers, strict=True):
            print(f"held-out prompt:\n{prompt}greedy answer:\n{answer}")

    return run.Data(
        batches=batches,
        evaluate=evaluate if val_batches else None,
        finish=finish,
        describe=(
            f"{len(tokens):,} training pairs ({dropped} dropped), {len(val_tokens):,} "
            f"held out, rows of {cfg.data.seq_len} tokens"
        ),
        throughput=("tokens", cfg.data.global_batch_size * cfg.data.seq_len),
    )


def _add_flags(p) -> None:
    p.add_argument("--base", help="the LM run (workdir) to fine-tune")
    p.add_argument("--data", help="prompt–response pairs, JSON lines")


def base_and_data_flags(args) -> list[str]:
    flags = []
    if args.base:
        flags.append(f"base={args.base}")
    if args.data:
        flags.append(f"data.path={args.data}")
    return flags


FAMILY = run.Family(
    name="sft",
    presets=PRESETS,
    default_preset="default",
    init=lm.init,
    init_from_params=lm.init_from_params,
    base_params=base_params,
    param_axes=lm.FAMILY.param_axes,
    rules=transformer.RULES,
    step=lm.make_step,
    data=data,
    check=lm.check,
    complete=complete,
    add_flags=_add_flags,
    flag_overrides=base_and_data_flags,
)
