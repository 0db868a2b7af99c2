"""Reward models: a language model with a scalar head, trained on preference pairs, on
the shared run layer.

base LM run (pre-trained or fine-tuned: its weights, config, tokenizer) → JSON lines
{"prompt", "chosen", "rejected"} (``genjax.rl.data``) → a row per response → the run
layer: the Bradley–Terry loss (optional margin) on r(chosen) − r(rejected) → held-out
pairwise accuracy → the rewards' mean and standard deviation over the training
responses, saved for whoever normalizes them (``normalization.json``).

The reward of ``<eod> prompt response <eod>`` is a linear head on the transformer's
final features at the closing ``<eod>``, the last real token, so the reward sees the
whole response and knows it ended. The head starts at N(0, 1/(D + 1)) (InstructGPT).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from genjax import evaluate as evallib
from genjax import mesh as meshlib
from genjax import run, sft, train
from genjax.data.rows import row_batches
from genjax.models import transformer
from genjax.rl import data as rldata
from genjax.rl import losses


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = ""  # JSON lines {"prompt", "chosen", "rejected"}
    val_fraction: float = 0.1  # share of pairs held out (by a hash of the prompt)
    seq_len: int = 128  # tokens per row: <eod> prompt response <eod> and padding
    global_batch_size: int = 16  # pairs per update
    seed: int = 0

    def __post_init__(self):
        if self.seq_len < 2 or self.global_batch_size < 1:
            raise ValueError("reward data config: seq_len >= 2 and global_batch_size >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"reward data config: val_fraction={self.val_fraction} not in [0, 1)")


@dataclasses.dataclass(frozen=True)
class Config:
    base: str = ""  # the LM run (its workdir) the reward model starts from
    margin: float = 0.0  # Bradley–Terry margin: −log σ(r_chosen − r_rejected − margin)
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
    return sft.with_base_model(cfg, explicit, "reward model", "the preference pairs")


# ----------------------------------------------------------------------------- the model


def init_head(cfg: transformer.Config, key: jax.Array) -> dict:
    std = 1.0 / math.sqrt(cfg.d_model + 1)
    return {"w_D": std * jax.random.normal(key, (cfg.d_model,)), "b": jnp.zeros(())}


def head_axes() -> dict:
    return {"w_D": ("embed",), "b": ()}


def last_token(mask_BT: jax.Array) -> jax.Array:
    """[B] index of each row's closing <eod> in its tokens: one past the last masked
    target (target j is token j + 1)."""
    T = mask_BT.shape[1]
    return T - jnp.argmax(mask_BT[:, ::-1] > 0, axis=1)


def rewards(cfg: transformer.Config, params: dict, tokens_BT1: jax.Array, mask_BT: jax.Array):
    """[B] the reward of each row: the head on the features of its closing <eod>."""
    features_BTD = transformer.features(cfg, params["lm"], tokens_BT1)
    at_B = last_token(mask_BT)
    features_BD = jnp.take_along_axis(features_BTD, at_B[:, None, None], axis=1)[:, 0]
    return jnp.einsum("BD,D->B", features_BD, params["head"]["w_D"]) + params["head"]["b"]


def pair_rewards(cfg: transformer.Config, params: dict, batch) -> tuple[jax.Array, jax.Array]:
    """(r_chosen [B], r_rejected [B]) of a batch of preference rows, in one forward."""
    tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    chosen_B, rejected_B = jnp.split(rewards(cfg, params, tokens, mask), 2)
    return chosen_B, rejected_B


def loss(cfg: Config, params: dict, batch) -> tuple[jax.Array, dict]:
    chosen_B, rejected_B = pair_rewards(cfg.model, params, batch)
    margin_B = jnp.full_like(chosen_B, cfg.margin) if cfg.margin else None
    return losses.bradley_terry_loss(chosen_B, rejected_B, margin_B)


def accuracy_sums(model: transformer.Config, params: dict, batch) -> dict[str, jax.Array]:
    """Correctly ordered pairs and pairs (``mask`` marks real rows): evaluate's sums."""
    chosen_B, rejected_B = pair_rewards(model, params, batch)
    weight_B = batch["mask"]
    return {"correct": jnp.sum((chosen_B > rejected_B) * weight_B), "pairs": jnp.sum(weight_B)}


def reward_sums(model: transformer.Config, params: dict, batch) -> dict[str, jax.Array]:
    """Sums of r and r² over the real rows of a batch of both responses."""
    chosen_B, rejected_B = pair_rewards(model, params, batch)
    weight_B = batch["mask"]
    return {
        "sum": jnp.sum((chosen_B + rejected_B) * weight_B),
        "sum_sq": jnp.sum((jnp.square(chosen_B) + jnp.square(rejected_B)) * weight_B),
        "count": 2 * jnp.sum(weight_B),
    }


# ----------------------------------------------------------------------------- the family


def make_optimizer(cfg: Config):
    mask = {"lm": transformer.decay_mask(cfg.model), "head": {"w_D": False, "b": False}}
    return train.make_optimizer(cfg.optim, decay_mask=lambda _: mask)


def init_from_params(cfg: Config, params: dict, key: jax.Array) -> train.TrainState:
    rng = jax.random.key_data(jax.random.fold_in(key, 1))
    return train.TrainState(jnp.zeros((), jnp.int32), params, make_optimizer(cfg).init(params), rng)


def init(cfg: Config, key: jax.Array) -> train.TrainState:
    params = {"lm": transformer.init(cfg.model, jax.random.fold_in(key, 0)),
              "head": init_head(cfg.model, jax.random.fold_in(key, 2))}  # fmt: skip
    return init_from_params(cfg, params, key)


def base_params(cfg: Config) -> dict:
    """The base run's weights under a fresh head."""
    head = init_head(cfg.model, jax.random.fold_in(jax.random.key(cfg.run.seed), 2))
    return {"lm": sft.load_base(cfg.base), "head": head}


def make_step(cfg: Config):
    def loss_fn(params, batch, *, key):
        del key
        return loss(cfg, params, batch)

    return train.make_train_step(loss_fn, make_optimizer(cfg), cfg.optim)


def param_axes(cfg: Config) -> dict:
    return {"params": {"lm": transformer.param_axes(cfg.model), "head": head_axes()}}


def check(cfg: Config, mesh) -> None:
    meshlib.check_batch_size(cfg.data.global_batch_size, mesh)
    meshlib.check_process_batch_layout(cfg.data.global_batch_size, mesh)
    train.check_micro_batches(cfg.optim.grad_accum, cfg.data.global_batch_size, mesh)


def eval_batches(rows: dict, size: int = 16) -> tuple[dict, ...]:
    n = len(rows["chosen"])
    with_weight = {**rows, "mask": np.ones(n, np.float32)}
    return tuple({k: v[i : i + size] for k, v in with_weight.items()} for i in range(0, n, size))


# Rewards scored for the normalization statistics: enough for their mean and std to ~3%
# of a std (lm-human-preferences normalizes on a few hundred samples), where scoring
# every training pair took minutes on a CPU.
NORMALIZATION_PAIRS = 1024


def normalization_sample(rows: dict) -> dict:
    """At most ``NORMALIZATION_PAIRS`` pairs, evenly spaced over the whole file."""
    n = len(rows["chosen"])
    take = np.unique(np.linspace(0, n - 1, min(n, NORMALIZATION_PAIRS)).astype(int))
    return {k: v[take] for k, v in rows.items()}


def data(cfg: Config, workdir: pathlib.Path) -> run.Data:
    tok = sft.copy_base_tokenizer(cfg.base, cfg.model, workdir)
    train_pairs, val_pairs = rldata.split(rldata.read_preferences(cfg.data.path),
                                          cfg.data.val_fraction)  # fmt: skip
    rows, dropped = rldata.preference_rows(tok, train_pairs, cfg.data.seq_len)
    if len(rows["chosen"]) < cfg.data.global_batch_size:
        raise ValueError(
            f"{cfg.data.path}: {len(rows['chosen'])} training pairs fit a row of "
            f"{cfg.data.seq_len} tokens ({dropped} dropped), fewer than a batch of "
            f"{cfg.data.global_batch_size}; add pairs or lower data.global_batch_size"
        )
    batches = row_batches(rows, cfg.data.global_batch_size, seed=cfg.data.seed)
    val_rows, _ = rldata.preference_rows(tok, val_pairs, cfg.data.seq_len)
    val_batches = eval_batches(val_rows)

    def evaluate(state: train.TrainState) -> dict[str, float]:
        sums = evallib.evaluate(_sums_fn(cfg.model, "accuracy"), state.params, val_batches)
        return {"val_accuracy": sums["correct"] / max(sums["pairs"], 1.0)}

    def finish(state: train.TrainState, metrics: dict[str, float]) -> None:
        if "val_accuracy" in metrics:
            print(f"held-out pairwise accuracy: {metrics['val_accuracy']:.4f} "
                  f"({len(val_rows['chosen'])} pairs)")  # fmt: skip
        sample = normalization_sample(rows)
        sums = evallib.evaluate(_sums_fn(cfg.model, "rewards"), state.params, eval_batches(sample))
        mean = sums["sum"] / sums["count"]
        std = math.sqrt(max(sums["sum_sq"] / sums["count"] - mean**2, 0.0))
        if jax.process_index() == 0:  # whole or not at all: load trusts it once there
            stats = {"mean": mean, "std": std, "step": int(state.step)}
            run.write_whole(workdir / "normalization.json", json.dumps(stats) + "\n")
        print(f"training rewards: mean {mean:.4f}, std {std:.4f} (saved for normalization)")

    return run.Data(
        batches=batches,
        evaluate=evaluate if len(val_rows["chosen"]) else None,
        finish=finish,
        describe=(
            f"{len(rows['chosen']):,} training pairs ({dropped} dropped), "
            f"{len(val_rows['chosen']):,} held out, rows of {cfg.data.seq_len} tokens"
        ),
        throughput=("pairs", cfg.data.global_batch_size),
    )


@functools.lru_cache(maxsize=8)
def _sums_fn(model: transformer.Config, which: str):
    # One function object per (config, sums), so evaluate compiles once per run.
    return functools.partial({"accuracy": accuracy_sums, "rewards": reward_sums}[which], model)


def load(workdir: str | pathlib.Path) -> tuple[transformer.Config, dict, dict[str, float]]:
    """(model config, parameters, {"mean", "std"} of its training rewards) of a trained
    reward model run."""
    loaded = run.load(workdir, FAMILY)
    path = pathlib.Path(workdir) / "normalization.json"
    if not path.is_file():
        raise ValueError(f"{path}: missing; the reward model run in {workdir} has not finished")
    stats = json.loads(path.read_text())
    if stats["step"] != loaded.step:
        raise ValueError(
            f"{path} holds the reward statistics of step {stats['step']}, but the newest "
            f"checkpoint is step {loaded.step}: the run has not finished; run it again"
        )
    return loaded.cfg.model, loaded.state.params, stats


def add_flags(p) -> None:
    p.add_argument("--base", help="the LM run (workdir) to start from (an SFT run, normally)")
    p.add_argument("--data", help="preference pairs, JSON lines {prompt, chosen, rejected}")


FAMILY = run.Family(
    name="reward_model",
    presets=PRESETS,
    default_preset="default",
    init=init,
    init_from_params=init_from_params,
    base_params=base_params,
    param_axes=param_axes,
    rules=transformer.RULES,
    step=make_step,
    data=data,
    check=check,
    complete=complete,
    add_flags=add_flags,
    flag_overrides=sft.base_and_data_flags,
)
