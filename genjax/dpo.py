"""Direct preference optimization of a language model on preference pairs, on the
shared run layer (Rafailov et al. 2023).

base LM run → JSON lines {"prompt", "chosen", "rejected"} → the reward model's rows
(``genjax.rl.data.preference_rows``) → the run layer: DPO's loss on the sequence
log-probs of each side under the policy and the frozen reference (the base) → held-out
accuracy of the implicit reward β (log π − log π_ref).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from genjax import evaluate as evallib
from genjax import lm, reward_model, run, sft, train
from genjax.data.rows import row_batches
from genjax.models import transformer
from genjax.rl import data as rldata
from genjax.rl import losses


@dataclasses.dataclass(frozen=True)
class Config:
    base: str = ""  # the LM run (its workdir) trained; also the frozen reference
    beta: float = 0.1  # DPO's β: the strength of the implicit KL to the reference
    model: transformer.Config = dataclasses.field(default_factory=transformer.Config)
    optim: train.OptimConfig = dataclasses.field(
        default_factory=lambda: train.OptimConfig(lr=1e-5, warmup_steps=10, weight_decay=0.0)
    )
    data: reward_model.DataConfig = dataclasses.field(default_factory=reward_model.DataConfig)
    run: run.RunConfig = dataclasses.field(
        default_factory=lambda: run.RunConfig(steps=200, checkpoint_every=100, eval_every=100)
    )

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"dpo: beta={self.beta} must be > 0")


PRESETS = {
    "default": Config(),
    "tiny": Config(
        data=reward_model.DataConfig(seq_len=32, global_batch_size=8),
        run=run.RunConfig(steps=6, checkpoint_every=3, eval_every=3, log_every=1),
    ),
}


class State(NamedTuple):
    step: jax.Array
    params: dict  # the policy LM
    opt_state: optax.OptState
    rng: jax.Array
    reference: dict  # the frozen reference LM (the base)


def complete(cfg: Config, explicit: frozenset[str]) -> Config:
    return sft.with_base_model(cfg, explicit, "dpo", "the preference pairs")


def pair_logprobs(model: transformer.Config, params, batch) -> tuple[jax.Array, jax.Array]:
    """(log π(chosen) [B], log π(rejected) [B]) in one forward."""
    tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    logits_BTV = transformer.forward(model, params, tokens[:, :-1])
    logp_BT = losses.token_logprobs(logits_BTV, tokens[:, 1:])
    return tuple(jnp.split(losses.sequence_logprob(logp_BT, mask), 2))


def loss(cfg: Config, params, reference, batch):
    chosen, rejected = pair_logprobs(cfg.model, params, batch)
    ref_chosen, ref_rejected = jax.lax.stop_gradient(pair_logprobs(cfg.model, reference, batch))
    return losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=cfg.beta)


def init_from_params(cfg: Config, params, key: jax.Array) -> State:
    optimizer = lm.make_optimizer(cfg)
    rng = jax.random.key_data(jax.random.fold_in(key, 1))
    reference = jax.tree.map(jnp.copy, params)  # replaced by the base's (``frozen``)
    return State(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng, reference)


def init(cfg: Config, key: jax.Array) -> State:
    return init_from_params(cfg, transformer.init(cfg.model, jax.random.fold_in(key, 0)), key)


def make_step(cfg: Config):
    optimizer = lm.make_optimizer(cfg)
    grad_fn = jax.value_and_grad(lambda p, ref, b: loss(cfg, p, ref, b), has_aux=True)
    schedule = train.make_schedule(cfg.optim)

    def step(state: State, batch):
        (value, metrics), grads = grad_fn(state.params, state.reference, batch)
        params, opt_state = train.apply_gradients(optimizer, state.params, state.opt_state, grads)
        metrics = {**metrics, "loss": value, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state.step)}  # fmt: skip
        return state._replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def check(cfg: Config, mesh) -> None:
    reward_model.check(cfg, mesh)
    train.refuse_micro_batches(cfg.optim, "DPO")


def accuracy_sums(model: transformer.Config, both, batch) -> dict[str, jax.Array]:
    """Pairs where the implicit reward ranks the chosen response first."""
    params, reference = both
    chosen, rejected = pair_logprobs(model, params, batch)
    ref_chosen, ref_rejected = pair_logprobs(model, reference, batch)
    right_B = (chosen - ref_chosen) > (rejected - ref_rejected)
    return {"correct": jnp.sum(right_B * batch["mask"]), "pairs": jnp.sum(batch["mask"])}


def data(cfg: Config, workdir: pathlib.Path) -> run.Data:
    tok = sft.copy_base_tokenizer(cfg.base, cfg.model, workdir)
    train_pairs, val_pairs = rldata.split(rldata.read_preferences(cfg.data.path),
                                          cfg.data.val_fraction)  # fmt: skip
    rows, dropped = rldata.preference_rows(tok, train_pairs, cfg.data.seq_len)
    batches = row_batches(rows, cfg.data.global_batch_size, seed=cfg.data.seed)
    val_rows, _ = rldata.preference_rows(tok, val_pairs, cfg.data.seq_len)
    val_batches = reward_model.eval_batches(val_rows)
    sums_fn = functools.partial(accuracy_sums, cfg.model)

    def evaluate(state: State) -> dict[str, float]:
        sums = evallib.evaluate(sums_fn, (state.params, state.reference), val_batches)
        return {"val_accuracy": sums["correct"] / max(sums["pairs"], 1.0)}

    return run.Data(
        batches=batches,
        evaluate=evaluate if val_batches else None,
        describe=f"{len(rows['chosen']):,} training pairs ({dropped} dropped)",
        throughput=("pairs", cfg.data.global_batch_size),
    )


FAMILY = run.Family(
    name="dpo",
    presets=PRESETS,
    default_preset="default",
    init=init,
    init_from_params=init_from_params,
    base_params=lambda cfg: sft.load_base(cfg.base),
    frozen=lambda cfg: {"reference": sft.load_base(cfg.base)},
    param_axes=lambda cfg: {
        "params": transformer.param_axes(cfg.model),
        "reference": transformer.param_axes(cfg.model),
    },
    rules=transformer.RULES,
    step=make_step,
    data=data,
    check=check,
    complete=complete,
    add_flags=reward_model.add_flags,
    flag_overrides=sft.base_and_data_flags,
)


def load_policy(workdir: str | pathlib.Path) -> tuple[transformer.Config, dict]:
    loaded = run.load(workdir, FAMILY)
    return loaded.cfg.model, loaded.state.params
