"""RL fine-tuning of a language model (PPO with a KL penalty, or GRPO), on the shared
run layer.

prompts (JSON lines {"prompt"}) → left-padded prompt rows → grain iterator → one
jitted step per update: rollouts with the KV-cache decoder → log-probs of the policy
and of the frozen reference, values, the score (a reward model run, or a Python
function of the text) → per-token rewards → advantages → several epochs of clipped
updates over minibatches → the KL coefficient's update.

The known implementation details of RLHF with PPO (Ziegler et al. 2019; Huang et al.,
"The N implementation details of RLHF with PPO", 2024) and where they are:

- A row is ``<eod> prompt response <eod>`` as in SFT; padding is ``<pad>``, never the
  end token. Rollout rows are shifted so every row starts at position 0 (the training
  forward has no padding mask: left padding would be attended to).
- The score arrives on the response's last token; every response token pays the KL
  penalty −β KL_t (k1 = log π − log π_ref, or k3), β fixed or adaptive (Ziegler's
  proportional controller toward ``kl_target`` per response).
- A response that used all ``max_new_tokens`` without ``<eod>`` scores
  ``truncation_penalty`` instead of its reward.
- Log-probs are read at the sampling temperature.
- Reward-model scores are normalized by the model's training-reward mean and std.
- GAE with γ, λ by a reverse scan over the response; advantages whitened over the
  response tokens; PPO's clipped policy and value losses; entropy bonus.
- The value is a zero-initialized head on the policy's own features (shared trunk).

GRPO (Shao et al. 2024) is the same step with ``algorithm="grpo"``: ``group_size``
responses per prompt, each advantage the response's score against its group's mean and
std, no value head in the loss, and the KL (k3) to the reference in the loss, not in
the reward. Two choices among the published variants: the losses are means over all the
minibatch's response tokens (DAPO's token-level mean; the paper's Eq. 3 first averages
each response), and the group's std is the population std (TRL's is the sample std).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import pathlib
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from genjax import mesh as meshlib
from genjax import reward_model, run, sft, train
from genjax.data.rows import row_batches
from genjax.models import transformer
from genjax.rl import data as rldata
from genjax.rl import losses
from genjax.sampling import decode
from genjax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class RLConfig:
    algorithm: str = "ppo"  # "ppo" or "grpo"
    # A reward model run (its workdir), or "module:function" taking (prompts, responses),
    # lists of str, and returning a float per response.
    reward: str = ""
    reference: str = ""  # the frozen reference LM run; default: the base
    prompts_per_update: int = 16
    group_size: int = 1  # responses per prompt (GRPO's group, >= 2)
    max_new_tokens: int = 16
    temperature: float = 1.0
    kl_coef: float = 0.05  # β, the initial value when adaptive
    kl_estimator: str = "k1"  # "k1" or "k3"
    kl_target: float = 0.0  # > 0: adapt β toward this KL per response
    kl_horizon: float = 10_000.0  # the adaptive controller's horizon, in responses
    # The score of a response cut off without <eod>; None keeps its reward.
    truncation_penalty: float | None = -1.0
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    value_coef: float = 0.1
    entropy_coef: float = 0.0
    epochs: int = 4
    minibatches: int = 4

    def __post_init__(self):
        if self.algorithm not in ("ppo", "grpo"):
            raise ValueError(f"rl.algorithm={self.algorithm!r}; choose 'ppo' or 'grpo'")
        if self.kl_estimator not in losses.KL_ESTIMATORS:
            raise ValueError(f"rl.kl_estimator={self.kl_estimator!r}; choose k1 or k3")
        if self.algorithm == "grpo" and self.group_size < 2:
            raise ValueError("rl.group_size must be >= 2 for GRPO (its baseline is the group)")
        for name in ("prompts_per_update", "group_size", "max_new_tokens", "epochs",
                     "minibatches"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"rl.{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"rl.temperature={self.temperature} must be > 0 (rollouts sample)")
        if self.prompts_per_update * self.group_size % self.minibatches:
            raise ValueError(
                f"rl.minibatches={self.minibatches} does not divide the "
                f"{self.prompts_per_update * self.group_size} responses of an update"
            )

    @property
    def responses(self) -> int:
        return self.prompts_per_update * self.group_size


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = ""  # JSON lines {"prompt": str}
    prompt_len: int = 16  # prompt tokens (with the leading <eod>); longer prompts are refused
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Config:
    base: str = ""  # the LM run (its workdir) trained: its weights start the policy
    rl: RLConfig = dataclasses.field(default_factory=RLConfig)
    model: transformer.Config = dataclasses.field(default_factory=transformer.Config)
    reward_model: transformer.Config = dataclasses.field(default_factory=transformer.Config)
    optim: train.OptimConfig = dataclasses.field(
        default_factory=lambda: train.OptimConfig(
            lr=1e-5, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, b2=0.999
        )
    )
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    run: run.RunConfig = dataclasses.field(
        default_factory=lambda: run.RunConfig(steps=100, checkpoint_every=50, log_every=5)
    )


PRESETS = {
    "default": Config(),
    "tiny": Config(
        rl=RLConfig(prompts_per_update=8, max_new_tokens=8, epochs=2, minibatches=2),
        run=run.RunConfig(steps=4, checkpoint_every=2, log_every=1),
    ),
}


class State(NamedTuple):
    step: jax.Array  # int32: updates (rollout + epochs) so far
    params: dict  # {"lm": policy, "value": {"w_D", "b"}}, trained
    opt_state: optax.OptState
    rng: jax.Array  # key data of the run's base key
    reference: dict  # the frozen reference LM
    reward: dict  # the frozen reward model ({"lm", "head"}), {} for a function reward
    kl_coef: jax.Array  # β, float32


def reward_is_model(cfg: Config) -> bool:
    return ":" not in cfg.rl.reward


def complete(cfg: Config, explicit: frozenset[str]) -> Config:
    """The model is the base run's, the reward model its run's; the checks that need
    other runs (vocabularies, context)."""
    if not cfg.base:
        raise ValueError("rlhf: give the LM run to train, --base LM_WORKDIR")
    if not cfg.data.path:
        raise ValueError('rlhf: give the prompts, --data PATH.jsonl (lines {"prompt": ...})')
    if not cfg.rl.reward:
        raise ValueError("rlhf: give the reward, --reward RM_WORKDIR or module:function")
    set_model = sorted(n for n in explicit if n.startswith(("model.", "reward_model.")))
    if set_model:
        raise ValueError(f"rlhf: the models are the runs'; do not set {', '.join(set_model)}")
    model = sft.base_model(cfg.base)
    policy_tok = sft.base_tokenizer(cfg.base, model)
    if cfg.rl.reference:
        check_same_vocabulary(cfg.base, cfg.rl.reference, "reference")
    cfg = dataclasses.replace(cfg, model=model)
    if reward_is_model(cfg):
        rm = run.saved_config(cfg.rl.reward, reward_model.FAMILY).model
        check_same_vocabulary(cfg.base, cfg.rl.reward, "reward model")
        cfg = dataclasses.replace(cfg, reward_model=rm)
    else:
        reward_function(cfg.rl.reward)  # resolvable
        cfg = dataclasses.replace(cfg, reward_model=_tiny_placeholder(policy_tok.vocab_size))
    length = cfg.data.prompt_len + cfg.rl.max_new_tokens
    if length > model.max_seq_len:
        raise ValueError(
            f"data.prompt_len + rl.max_new_tokens = {length} exceeds the model's context "
            f"{model.max_seq_len}; lower one of them"
        )
    if "optim.total_steps" not in explicit:  # the schedule counts optimizer updates
        updates = cfg.run.steps * cfg.rl.epochs * cfg.rl.minibatches
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, total_steps=updates))
    return cfg


def _tiny_placeholder(vocab_size: int) -> transformer.Config:
    """The reward-model section of a run scored by a function: no model is built from it."""
    return transformer.Config(vocab_size=vocab_size, d_model=8, num_layers=1, num_heads=1,
                              num_kv_heads=1, head_dim=8, ffn_dim=8, max_seq_len=8)  # fmt: skip


def check_same_vocabulary(base: str, other: str, role: str) -> None:
    """The policy and ``other`` must read the same tokens: the same tokenizer file."""
    a = pathlib.Path(base) / "tokenizer.model"
    b = pathlib.Path(other) / "tokenizer.model"
    if not b.is_file():
        raise ValueError(f"{b}: missing; the {role} {other} is not a language-model run")
    if a.read_bytes() != b.read_bytes():
        va, vb = Tokenizer.load(a).vocab_size, Tokenizer.load(b).vocab_size
        raise ValueError(
            f"the policy ({a}, {va} pieces) and the {role} ({b}, {vb} pieces) have "
            f"different vocabularies; train the {role} from the policy's base run"
        )


def reward_function(spec: str) -> Callable:
    """The Python reward ``module:function`` names."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"rl.reward={spec!r}: cannot import it ({e})") from None
    if not callable(fn):
        raise ValueError(f"rl.reward={spec!r} is not callable")
    return fn


# ----------------------------------------------------------------------------- rollouts


def assemble(prompt_BP: jax.Array, start_B: jax.Array, new_BN: jax.Array, *, eod: int, pad: int):
    """(tokens [B, L], response mask over targets [B, L − 1], ended [B]) of rollouts:
    each row ``prompt response`` shifted to start at position 0, padded after with
    ``pad``; target t (token t + 1) is masked in where token t + 1 is a response token
    (its closing ``eod`` included); ``ended`` where the response produced ``eod``."""
    P = prompt_BP.shape[1]
    L = P + new_BN.shape[1]
    joined_BL = jnp.concatenate([prompt_BP, jnp.where(new_BN >= 0, new_BN, pad)], axis=1)
    index_BL = (jnp.arange(L)[None] + start_B[:, None]) % L  # left padding wraps to the end
    shifted_BL = jnp.take_along_axis(joined_BL, index_BL, axis=1)
    prompt_len_B = P - start_B
    response_len_B = jnp.sum(new_BN >= 0, axis=1)
    position_BL = jnp.arange(L)[None]
    tokens_BL = jnp.where(position_BL < (prompt_len_B + response_len_B)[:, None], shifted_BL, pad)
    target_pos_BT = position_BL[:, 1:]
    mask_BT = (target_pos_BT >= prompt_len_B[:, None]) & (
        target_pos_BT < (prompt_len_B + response_len_B)[:, None]
    )
    return tokens_BL, mask_BT.astype(jnp.float32), jnp.any(new_BN == eod, axis=1)


def texts_of(tok: Tokenizer, tokens_BL: np.ndarray, mask_BT: np.ndarray, ended_B: np.ndarray):
    """(prompts, responses) as text: a response without its closing <eod>."""
    prompts, responses = [], []
    for tokens, mask, ended in zip(tokens_BL, mask_BT, ended_B, strict=True):
        where = np.nonzero(mask)[0] + 1  # token positions of the response
        first, last = (int(where[0]), int(where[-1]) + 1) if len(where) else (len(tokens), 0)
        prompts.append(tok.decode(tokens[1:first].tolist()))
        responses.append(tok.decode(tokens[first : last - int(ended)].tolist()))
    return prompts, responses


def make_score(cfg: Config, tok: Tokenizer):
    """(state, tokens [B, L], mask [B, T], ended [B]) -> the score of each response,
    before the truncation penalty: the normalized reward model, or the function."""
    if reward_is_model(cfg):
        stats = json.loads((pathlib.Path(cfg.rl.reward) / "normalization.json").read_text())
        mean, std = stats["mean"], max(stats["std"], 1e-6)

        def score(state, tokens_BL, mask_BT, ended_B):
            del ended_B
            r_B = reward_model.rewards(cfg.reward_model, state.reward, tokens_BL, mask_BT)
            return (r_B - mean) / std

        return score
    fn = reward_function(cfg.rl.reward)

    def host(tokens_BL, mask_BT, ended_B):
        prompts, responses = texts_of(tok, np.asarray(tokens_BL), np.asarray(mask_BT),
                                      np.asarray(ended_B))  # fmt: skip
        return np.asarray(fn(prompts, responses), np.float32)

    def score(state, tokens_BL, mask_BT, ended_B):
        del state
        shape = jax.ShapeDtypeStruct(ended_B.shape, jnp.float32)
        # The host reads whole arrays: gather them first, since XLA cannot hand a
        # batch-sharded array to a callback on one device without a full rematerialization.
        args = [meshlib.constrain(x, (None,) * x.ndim, {}) for x in (tokens_BL, mask_BT, ended_B)]
        return jax.pure_callback(host, shape, *args)

    return score


# ----------------------------------------------------------------------------- the step


def init_value_head(cfg: transformer.Config) -> dict:
    return {"w_D": jnp.zeros((cfg.d_model,)), "b": jnp.zeros(())}


def make_optimizer(cfg: Config):
    mask = {"lm": transformer.decay_mask(cfg.model), "value": {"w_D": False, "b": False}}
    return train.make_optimizer(cfg.optim, decay_mask=lambda _: mask)


def policy_outputs(cfg: Config, params: dict, tokens_BL: jax.Array):
    """(log-probs of the targets at the sampling temperature [B, T], values [B, T],
    logits [B, T, V]) of rows of tokens."""
    logits_BTV, features_BTD = transformer.forward_with_features(
        cfg.model, params["lm"], tokens_BL[:, :-1]
    )
    logits_BTV = logits_BTV / cfg.rl.temperature
    logp_BT = losses.token_logprobs(logits_BTV, tokens_BL[:, 1:])
    value_BT = jnp.einsum("BTD,D->BT", features_BTD, params["value"]["w_D"]) + params["value"]["b"]
    return logp_BT, value_BT, logits_BTV


def token_rewards(score_B, kl_BT, mask_BT, kl_coef):
    """[B, T]: −β KL on every response token, plus the score on the last one."""
    T = mask_BT.shape[1]
    last_BT = jax.nn.one_hot(T - 1 - jnp.argmax(mask_BT[:, ::-1] > 0, axis=1), T)
    return (-kl_coef * kl_BT + score_B[:, None] * last_BT) * mask_BT


def advantages(rl: RLConfig, reward_BT, value_BT, mask_BT):
    """(advantages, returns) [B, T] by GAE over the response tokens (the response ends
    at its last token: no bootstrap past it)."""
    value_BT = value_BT * mask_BT
    next_value_BT = jnp.concatenate([value_BT[:, 1:], jnp.zeros_like(value_BT[:, :1])], axis=1)
    end_BT = mask_BT * (1.0 - jnp.concatenate([mask_BT[:, 1:], jnp.zeros_like(mask_BT[:, :1])],
                                              axis=1))  # fmt: skip
    adv_TB, ret_TB = losses.gae(reward_BT.T, value_BT.T, next_value_BT.T, end_BT.T, end_BT.T,
                                gamma=rl.gamma, lam=rl.lam)  # fmt: skip
    return adv_TB.T, ret_TB.T


def minibatch_loss(cfg: Config, params: dict, mb: dict):
    rl = cfg.rl
    logp_BT, value_BT, logits_BTV = policy_outputs(cfg, params, mb["tokens"])
    mask_BT = mb["mask"]
    loss, metrics = losses.clipped_policy_loss(logp_BT, mb["logp"], mb["advantage"], clip=rl.clip,
                                               mask=mask_BT)  # fmt: skip
    entropy = losses.masked_mean(losses.entropy(logits_BTV), mask_BT)
    metrics = {**metrics, "policy_loss": loss, "entropy": entropy}
    loss = loss - rl.entropy_coef * entropy
    if rl.algorithm == "ppo":
        v_loss, v_metrics = losses.clipped_value_loss(
            value_BT, mb["value"], mb["return"], clip=rl.value_clip, mask=mask_BT
        )
        loss = loss + rl.value_coef * v_loss
        metrics = {**metrics, **v_metrics}
    else:
        kl = losses.masked_mean(losses.kl_k3(logp_BT, mb["ref_logp"]), mask_BT)
        loss = loss + mb["kl_coef"] * kl
    return loss, metrics


def make_step(cfg: Config):
    rl, model = cfg.rl, cfg.model
    tok = sft.base_tokenizer(cfg.base, model)
    score = make_score(cfg, tok)
    optimizer = make_optimizer(cfg)
    grad_fn = jax.value_and_grad(lambda p, mb: minibatch_loss(cfg, p, mb), has_aux=True)
    estimator = losses.KL_ESTIMATORS[rl.kl_estimator]
    G = rl.group_size

    def rollout(state: State, batch, key):
        prompt_BP = jnp.repeat(batch["prompt"], G, axis=0)
        start_B = jnp.repeat(batch["start"], G, axis=0)
        seeds_B = jax.random.bits(key, (prompt_BP.shape[0],), jnp.uint32)
        new_BN = decode.sample_in_jit(model, state.params["lm"], prompt_BP, start_B, seeds_B,
                                      temperature=rl.temperature, max_new_tokens=rl.max_new_tokens,
                                      eos_id=tok.eos_id)  # fmt: skip
        return assemble(prompt_BP, start_B, new_BN, eod=tok.eos_id, pad=tok.pad_id)

    def step(state: State, batch):
        key_rollout, key_epochs = jax.random.split(train.step_key(state))
        tokens_BL, mask_BT, ended_B = rollout(state, batch, key_rollout)
        logp_BT, value_BT, _ = policy_outputs(cfg, state.params, tokens_BL)
        ref_logits_BTV = transformer.forward(model, state.reference, tokens_BL[:, :-1])
        ref_logp_BT = losses.token_logprobs(ref_logits_BTV / rl.temperature, tokens_BL[:, 1:])
        raw_score_B = score(state, tokens_BL, mask_BT, ended_B)
        score_B = raw_score_B
        if rl.truncation_penalty is not None:
            score_B = jnp.where(ended_B, raw_score_B, rl.truncation_penalty)
        kl_BT = estimator(logp_BT, ref_logp_BT) * mask_BT
        if rl.algorithm == "ppo":
            reward_BT = token_rewards(score_B, kl_BT, mask_BT, state.kl_coef)
            advantage_BT, return_BT = advantages(rl, reward_BT, value_BT, mask_BT)
            advantage_BT = losses.whiten(advantage_BT, mask_BT)
        else:
            advantage_B = losses.grpo_advantages(score_B.reshape(-1, G)).reshape(-1)
            advantage_BT, return_BT = advantage_B[:, None] * mask_BT, jnp.zeros_like(value_BT)
        rollouts = {"tokens": tokens_BL, "mask": mask_BT, "logp": logp_BT, "value": value_BT,
                    "ref_logp": ref_logp_BT, "advantage": advantage_BT,
                    "return": return_BT}  # fmt: skip
        rollouts = jax.tree.map(jax.lax.stop_gradient, rollouts)
        params, opt_state, metrics = learn(state, rollouts, key_epochs)
        kl_B = jnp.sum(kl_BT, axis=1)
        kl_coef = state.kl_coef
        if rl.kl_target > 0:
            kl_coef = losses.adaptive_kl_coef(
                kl_coef, jnp.mean(kl_B), target=rl.kl_target, horizon=rl.kl_horizon,
                batch=kl_B.shape[0],
            )  # fmt: skip
        metrics = {
            **metrics,
            "score": jnp.mean(raw_score_B),
            "kl": jnp.mean(kl_B),
            "kl_coef": state.kl_coef,
            "response_length": jnp.mean(jnp.sum(mask_BT, axis=1)),
            "truncated": 1.0 - jnp.mean(ended_B.astype(jnp.float32)),
        }
        new_state = state._replace(step=state.step + 1, params=params, opt_state=opt_state,
                                   kl_coef=kl_coef)  # fmt: skip
        return new_state, metrics

    def learn(state: State, rollouts: dict, key):
        """``rl.epochs`` passes over the rollouts in ``rl.minibatches`` shuffled minibatches."""
        B = rl.responses
        M = rl.minibatches

        def one_update(carry, mb):
            params, opt_state = carry
            (loss, metrics), grads = grad_fn(params, {**mb, "kl_coef": state.kl_coef})
            params, opt_state = train.apply_gradients(optimizer, params, opt_state, grads)
            return (params, opt_state), {
                **metrics,
                "loss": loss,
                "grad_norm": optax.tree.norm(grads),
            }

        def one_epoch(carry, epoch_key):
            order = jax.random.permutation(epoch_key, B)
            minibatches = jax.tree.map(lambda x: x[order].reshape(M, B // M, *x.shape[1:]),
                                       rollouts)  # fmt: skip
            return jax.lax.scan(one_update, carry, minibatches)

        carry = (state.params, state.opt_state)
        (params, opt_state), metrics = jax.lax.scan(
            one_epoch, carry, jax.random.split(key, rl.epochs)
        )
        return params, opt_state, jax.tree.map(jnp.mean, metrics)

    return step


# ----------------------------------------------------------------------------- the family


def _reward_params(cfg: Config, key: jax.Array) -> dict:
    if not reward_is_model(cfg):
        return {}
    return {"lm": transformer.init(cfg.reward_model, jax.random.fold_in(key, 3)),
            "head": reward_model.init_head(cfg.reward_model, key)}  # fmt: skip


def init_from_params(cfg: Config, params: dict, key: jax.Array) -> State:
    """The state around the policy's parameters; the reference starts as a copy of the
    policy (the run layer's ``frozen`` replaces it, and the reward model, from their runs)."""
    rng = jax.random.key_data(jax.random.fold_in(key, 1))
    return State(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=make_optimizer(cfg).init(params),
        rng=rng,
        reference=jax.tree.map(jnp.copy, params["lm"]),
        reward=_reward_params(cfg, key),
        kl_coef=jnp.float32(cfg.rl.kl_coef),
    )


def init(cfg: Config, key: jax.Array) -> State:
    params = {"lm": transformer.init(cfg.model, jax.random.fold_in(key, 0)),
              "value": init_value_head(cfg.model)}  # fmt: skip
    return init_from_params(cfg, params, key)


def base_params(cfg: Config) -> dict:
    return {"lm": sft.load_base(cfg.base), "value": init_value_head(cfg.model)}


def frozen(cfg: Config) -> dict:
    """The reference LM and the reward model, read from their runs."""
    trees = {"reference": sft.load_base(cfg.rl.reference or cfg.base)}
    if reward_is_model(cfg):
        trees["reward"] = run.load(cfg.rl.reward, reward_model.FAMILY).state.params
    return trees


def param_axes(cfg: Config) -> dict:
    axes = {
        "params": {
            "lm": transformer.param_axes(cfg.model),
            "value": reward_model.head_axes(),
        },
        "reference": transformer.param_axes(cfg.model),
    }
    if reward_is_model(cfg):
        axes["reward"] = {"lm": transformer.param_axes(cfg.reward_model),
                          "head": reward_model.head_axes()}  # fmt: skip
    return axes


def check(cfg: Config, mesh) -> None:
    meshlib.check_batch_size(cfg.rl.prompts_per_update, mesh)
    meshlib.check_process_batch_layout(cfg.rl.prompts_per_update, mesh)
    train.refuse_micro_batches(cfg.optim, "RL (its minibatches are rl.minibatches)")


def prompt_rows(tok: Tokenizer, prompts: list[str], prompt_len: int, path: str):
    """{"prompt": [N, prompt_len] left-padded ``<eod> prompt``, "start": [N]}."""
    rows = np.full((len(prompts), prompt_len), tok.pad_id, np.int32)
    start = np.zeros(len(prompts), np.int32)
    for i, ids in enumerate(tok.encode_batch(prompts)):
        ids = [tok.eos_id, *ids]
        if len(ids) > prompt_len:
            raise ValueError(
                f"{path}: prompt {i + 1} has {len(ids)} tokens with its leading <eod>, more "
                f"than data.prompt_len={prompt_len}; raise it or shorten the prompt"
            )
        rows[i, prompt_len - len(ids) :] = ids
        start[i] = prompt_len - len(ids)
    return {"prompt": rows, "start": start}


def data(cfg: Config, workdir: pathlib.Path) -> run.Data:
    tok = sft.copy_base_tokenizer(cfg.base, cfg.model, workdir)  # None: driven by hand
    prompts = [r["prompt"] for r in rldata.read_jsonl(cfg.data.path, ("prompt",))]
    rows = prompt_rows(tok, prompts, cfg.data.prompt_len, cfg.data.path)
    # Fewer prompts than an update samples: each appears several times per pass.
    copies = -(-cfg.rl.prompts_per_update // len(prompts))
    rows = {k: np.concatenate([v] * copies) for k, v in rows.items()}
    batches = row_batches(rows, cfg.rl.prompts_per_update, seed=cfg.data.seed)
    return run.Data(
        batches=batches,
        describe=f"{len(prompts):,} prompts, {cfg.rl.responses} responses per update",
        throughput=("responses", cfg.rl.responses),
    )


def _add_flags(p) -> None:
    p.add_argument("--base", help="the LM run (workdir) to train")
    p.add_argument("--data", help="prompts, JSON lines {prompt}")
    p.add_argument("--reward", help="a reward model run (workdir) or module:function")


def _flag_overrides(args) -> list[str]:
    flags = sft.base_and_data_flags(args)
    if args.reward:
        flags.append(f"rl.reward={args.reward}")
    return flags


FAMILY = run.Family(
    name="rlhf",
    presets=PRESETS,
    default_preset="default",
    init=init,
    init_from_params=init_from_params,
    base_params=base_params,
    frozen=frozen,
    param_axes=param_axes,
    rules=transformer.RULES,
    step=make_step,
    data=data,
    check=check,
    complete=complete,
    compare=("model", "reward_model", "data", "rl"),
    add_flags=_add_flags,
    flag_overrides=_flag_overrides,
)


def load_policy(workdir: str | pathlib.Path) -> tuple[transformer.Config, dict]:
    """(model config, policy LM parameters) of an RL run's newest checkpoint."""
    loaded = run.load(workdir, FAMILY)
    return loaded.cfg.model, loaded.state.params["lm"]


# ----------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class Samples:
    prompts: list[str]
    responses: list[str]  # without the closing <eod>
    tokens: np.ndarray  # [B, L] rows <eod> prompt response <eod> <pad>...
    mask: np.ndarray  # [B, L - 1] response targets
    ended: np.ndarray  # [B] whether the response produced <eod>


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eod", "pad"))
def _sample_rows(model, params, prompt_BP, start_B, seeds_B, temperature, *, max_new_tokens,
                 eod, pad):  # fmt: skip
    new_BN = decode.sample_in_jit(model, params, prompt_BP, start_B, seeds_B,
                                  temperature=temperature, max_new_tokens=max_new_tokens,
                                  eos_id=eod)  # fmt: skip
    return assemble(prompt_BP, start_B, new_BN, eod=eod, pad=pad)


def sample(model: transformer.Config, params, tok: Tokenizer, prompts: list[str], *,
           max_new_tokens: int, temperature: float = 1.0, seed: int = 0,
           prompt_len: int = 16) -> Samples:  # fmt: skip
    """One response to each prompt, drawn as the rollouts draw them."""
    rows = prompt_rows(tok, prompts, prompt_len, "prompts")
    seeds = np.arange(seed, seed + len(prompts), dtype=np.uint32)
    tokens, mask, ended = jax.device_get(_sample_rows(
        model, params, rows["prompt"], rows["start"], seeds, jnp.float32(temperature),
        max_new_tokens=max_new_tokens, eod=tok.eos_id, pad=tok.pad_id,
    ))  # fmt: skip
    texts = texts_of(tok, tokens, mask, ended)
    return Samples(*texts, tokens, mask, ended)


@functools.partial(jax.jit, static_argnames=("model",))
def sequence_logprobs(model: transformer.Config, params, tokens_BL, mask_BT, temperature=1.0):
    """[B] log π(response) at the temperature."""
    logits_BTV = transformer.forward(model, params, tokens_BL[:, :-1]) / temperature
    return losses.sequence_logprob(losses.token_logprobs(logits_BTV, tokens_BL[:, 1:]), mask_BT)


@functools.partial(jax.jit, static_argnames=("model",))
def _reward_model_scores(model: transformer.Config, params, tokens_BL, mask_BT):
    return reward_model.rewards(model, params, tokens_BL, mask_BT)


def proxy_rewards(rm_workdir: str | pathlib.Path, samples: Samples) -> np.ndarray:
    """[B] the reward model's normalized scores of the samples."""
    model, params, stats = reward_model.load(rm_workdir)
    scores = _reward_model_scores(model, params, samples.tokens, samples.mask)
    return (np.asarray(scores) - stats["mean"]) / max(stats["std"], 1e-6)


def evaluate_policy(
    model: transformer.Config, params, reference, tok: Tokenizer, prompts: list[str], *,
    gold: Callable, reward_model_dir, max_new_tokens: int, prompt_len: int, seed: int = 0,
) -> tuple[dict[str, float], Samples]:  # fmt: skip
    """A policy's samples (one per prompt, temperature 1) scored: the mean gold reward,
    the reward model's normalized proxy reward, the KL to ``reference`` (the mean over
    samples of log π − log π_ref, nats per response) and the mean response length."""
    s = sample(model, params, tok, prompts, max_new_tokens=max_new_tokens, seed=seed,
               prompt_len=prompt_len)  # fmt: skip
    logp = np.asarray(sequence_logprobs(model, params, s.tokens, s.mask))
    ref_logp = np.asarray(sequence_logprobs(model, reference, s.tokens, s.mask))
    scores = {
        "gold_reward": float(np.mean(gold(s.prompts, s.responses))),
        "proxy_reward": float(np.mean(proxy_rewards(reward_model_dir, s))),
        "kl": float(np.mean(logp - ref_logp)),
        "response_tokens": float(np.mean(np.sum(s.mask, axis=1))),  # with the closing <eod>
    }
    return scores, s


def check_pipeline_workdir(workdir: pathlib.Path, settings: dict) -> None:
    """Records what a pipeline's workdir is made with (``pipeline.json``: --quick, the
    base), or refuses a command that asks for other settings: its stages would resume
    the recorded ones' runs (a smoke run's data and steps) as if they were its own."""
    path = workdir / "pipeline.json"
    if path.exists():
        recorded = json.loads(path.read_text())
        differ = [f"{k}: {recorded.get(k)!r} there, {v!r} asked" for k, v in settings.items()
                  if recorded.get(k) != v]  # fmt: skip
        if differ:
            raise ValueError(
                f"{workdir} holds a pipeline made otherwise ({'; '.join(differ)}); run the "
                "command it was made with, or use another --workdir"
            )
        return
    run.write_whole(path, json.dumps(settings) + "\n")


def over_seeds(rows: list[dict[str, float]], worst: str) -> dict:
    """One method's scores over seeds (a row each): every score's mean, the lowest
    ``worst`` score as ``worst_<worst>``, and each seed's scores under ``per_seed``."""
    keys = rows[0].keys()
    summary = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    summary[f"worst_{worst}"] = float(min(r[worst] for r in rows))
    summary["per_seed"] = {k: [r[k] for r in rows] for k in keys}
    return summary
