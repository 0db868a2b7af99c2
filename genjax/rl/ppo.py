"""PPO for any jittable environment, in purejaxrl's design: the whole run is one jitted
function of a key.

    train = make_train(PPOConfig(env="CartPole-v1"))
    params, metrics = jax.jit(train)(key)                  # one seed
    params, metrics = jax.jit(jax.vmap(train))(keys)       # many seeds at once
    params, metrics = jax.jit(jax.vmap(train))(shard_seeds(keys))  # ... over the devices

Glossary: U updates, T steps per rollout, B environments side by side, N = T·B
transitions per update, M minibatches, O observation features (flattened), A actions.

``train`` is a ``lax.scan`` over U updates. Each update rolls the policy out for T
steps in B environments (``vmap`` of a gymnax environment, inside a ``lax.scan``),
computes advantages by GAE, and takes ``update_epochs`` passes of M shuffled
minibatches of Adam on the clipped PPO loss (``genjax.rl.losses``).

Episodes end two ways, kept apart: *terminated* (the pole fell: the next state is
worth 0) and *truncated* (CartPole's 500-step limit: the next state is worth V(s'),
read from gymnax's ``final_observation`` before the reset). Networks are
purejaxrl's: separate actor and critic MLPs (2 × 64, tanh, orthogonal init); discrete
actions by a softmax, continuous ones by a diagonal Gaussian with a learned log-std.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NoReturn

import jax
import jax.numpy as jnp
import numpy as np
import optax

from genjax import mesh as meshlib
from genjax.rl import losses


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """purejaxrl's CartPole settings (themselves CleanRL's)."""

    env: str = "CartPole-v1"  # any name in gymnax.registered_envs
    num_envs: int = 4  # B
    num_steps: int = 128  # T, per rollout
    total_timesteps: int = 500_000  # environment steps in all, over the B environments
    update_epochs: int = 4
    num_minibatches: int = 4  # M
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2  # ε of the policy ratio
    value_clip: float | None = 0.2  # ε of the value's change; None: no clipping
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    lr: float = 2.5e-4
    anneal_lr: bool = True  # linearly to 0 over the updates
    max_grad_norm: float = 0.5
    adam_eps: float = 1e-5
    hidden: int = 64  # units of each of the two hidden layers, actor and critic alike
    normalize_advantages: bool = True  # whiten each minibatch's advantages

    def __post_init__(self):
        def bad(msg: str) -> NoReturn:
            raise ValueError(f"ppo config: {msg}")

        for name in ("num_envs", "num_steps", "update_epochs", "num_minibatches", "hidden"):
            if getattr(self, name) < 1:
                bad(f"{name}={getattr(self, name)} must be >= 1")
        if self.total_timesteps < self.num_envs * self.num_steps:
            bad(
                f"total_timesteps={self.total_timesteps} is less than one rollout of "
                f"num_envs × num_steps = {self.num_envs * self.num_steps}"
            )
        if (self.num_envs * self.num_steps) % self.num_minibatches:
            bad(
                f"a rollout of {self.num_envs} × {self.num_steps} transitions does not split "
                f"into num_minibatches={self.num_minibatches}"
            )
        if not (0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1):
            bad(f"gamma={self.gamma} and gae_lambda={self.gae_lambda} must be in [0, 1]")
        if self.clip <= 0 or (self.value_clip is not None and self.value_clip <= 0):
            bad(f"clip={self.clip} and value_clip={self.value_clip} must be > 0")
        if self.lr <= 0 or self.max_grad_norm <= 0:
            bad(f"lr={self.lr} and max_grad_norm={self.max_grad_norm} must be > 0")

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // (self.num_envs * self.num_steps)

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.num_steps


# ----------------------------------------------------------------------------- environments


def make_env(name: str):
    """(env, env_params) of a gymnax environment by name; an unknown name is an error
    that lists the known ones."""
    import gymnax  # only PPO on environments needs it

    if name not in gymnax.registered_envs:
        raise ValueError(
            f"unknown gymnax environment {name!r}; choose one of: "
            + ", ".join(sorted(gymnax.registered_envs))
        )
    return gymnax.make(name)


def _action_space(env, env_params):
    """(discrete?, A): the number of actions, or the dimension of a continuous action."""
    space = env.action_space(env_params)
    if hasattr(space, "n"):
        return True, int(space.n)
    return False, int(math.prod(space.shape))


# ----------------------------------------------------------------------------- networks


def orthogonal(key, shape: tuple[int, int], gain: float, iterations: int = 60) -> jax.Array:
    """A random (semi-)orthogonal matrix [I, O] times ``gain``, Haar-distributed: the polar
    factor of a Gaussian matrix, by Newton–Schulz iterations X ← 1.5 X − 0.5 X XᵀX.

    Matmuls only, where ``jax.nn.initializers.orthogonal`` calls LAPACK's QR: under
    ``vmap`` over seeds that is a batched QR, whose kernel splits its batch over XLA:CPU's
    thread pool from inside a task of that same pool, and on 2 cores it deadlocked (every
    thread parked) in 2 of 3 runs of 16 seeds. Scaled by the Frobenius norm, every
    singular value starts in (0, 1]; each iteration multiplies a small one by ~1.5 and
    then converges quadratically to 1.
    """
    rows, cols = shape
    x = jax.random.normal(key, (max(rows, cols), min(rows, cols)), jnp.float32)
    x = x / jnp.linalg.norm(x)
    x = jax.lax.fori_loop(0, iterations, lambda _, x: 1.5 * x - 0.5 * x @ (x.T @ x), x)
    return gain * (x if rows >= cols else x.T)


def _mlp_init(key, sizes: list[int], out_scale: float) -> list[dict]:
    """Dense layers of ``sizes``: orthogonal weights (gain √2, the last ``out_scale``),
    zero biases, as in purejaxrl."""
    keys = jax.random.split(key, len(sizes) - 1)
    layers = []
    for n, (k, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True)):
        gain = out_scale if n == len(sizes) - 2 else math.sqrt(2)
        w = orthogonal(k, (fan_in, fan_out), gain)
        layers.append({"w": w, "b": jnp.zeros((fan_out,), jnp.float32)})
    return layers


def _mlp(layers: list[dict], x_BI: jax.Array) -> jax.Array:
    for layer in layers[:-1]:
        x_BI = jnp.tanh(x_BI @ layer["w"] + layer["b"])
    return x_BI @ layers[-1]["w"] + layers[-1]["b"]


def init_params(cfg: PPOConfig, key, obs_dim: int, discrete: bool, actions: int) -> dict:
    k_actor, k_critic = jax.random.split(key)
    hidden = [cfg.hidden, cfg.hidden]
    params = {
        "actor": _mlp_init(k_actor, [obs_dim, *hidden, actions], 0.01),
        "critic": _mlp_init(k_critic, [obs_dim, *hidden, 1], 1.0),
    }
    if not discrete:
        params["log_std"] = jnp.zeros((actions,), jnp.float32)
    return params


def value(params: dict, obs_BO: jax.Array) -> jax.Array:
    """V(s) [B]."""
    return _mlp(params["critic"], obs_BO)[:, 0]


def log_prob_and_entropy(params: dict, obs_BO, action_B, discrete: bool):
    """(log π(a|s) [B], H(π(·|s)) [B])."""
    return _log_prob_and_entropy(params, _mlp(params["actor"], obs_BO), action_B, discrete)


def _log_prob_and_entropy(params: dict, out_BA, action_B, discrete: bool):
    """The same from the actor's output (logits, or the Gaussian's mean)."""
    if discrete:
        logp_BA = jax.nn.log_softmax(out_BA)
        logp_B = jnp.take_along_axis(logp_BA, action_B[:, None], axis=-1)[:, 0]
        return logp_B, losses.entropy(out_BA)
    log_std_A = params["log_std"]
    z_BA = (action_B - out_BA) * jnp.exp(-log_std_A)
    logp_B = jnp.sum(-0.5 * jnp.square(z_BA) - log_std_A - 0.5 * math.log(2 * math.pi), -1)
    entropy = jnp.sum(log_std_A + 0.5 * math.log(2 * math.pi * math.e))
    return logp_B, jnp.broadcast_to(entropy, logp_B.shape)


def sample_action(params: dict, obs_BO, key, discrete: bool):
    """(a ~ π(·|s) [B] or [B, A], log π(a|s) [B])."""
    out_BA = _mlp(params["actor"], obs_BO)
    if discrete:
        action_B = jax.random.categorical(key, out_BA)
    else:
        noise_BA = jax.random.normal(key, out_BA.shape)
        action_B = out_BA + jnp.exp(params["log_std"]) * noise_BA
    return action_B, _log_prob_and_entropy(params, out_BA, action_B, discrete)[0]


# ----------------------------------------------------------------------------- the loss


def ppo_loss(cfg: PPOConfig, params, batch, discrete: bool):
    """(loss, metrics) of one minibatch: clipped policy loss + c_v · value loss
    − c_e · entropy."""
    logp, ent = log_prob_and_entropy(params, batch["obs"], batch["action"], discrete)
    advantage = batch["advantage"]
    if cfg.normalize_advantages:
        advantage = losses.whiten(advantage)
    policy_loss, policy_metrics = losses.clipped_policy_loss(
        logp, batch["logp"], advantage, clip=cfg.clip
    )
    value_loss, value_metrics = losses.clipped_value_loss(
        value(params, batch["obs"]), batch["value"], batch["return"], clip=cfg.value_clip
    )
    entropy = jnp.mean(ent)
    loss = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy
    metrics = {"policy_loss": policy_loss, "value_loss": value_loss, "entropy": entropy,
               **policy_metrics, **value_metrics}  # fmt: skip
    return loss, metrics


def make_optimizer(cfg: PPOConfig) -> optax.GradientTransformation:
    """Adam after global-norm clipping; the rate falls linearly to 0 over the updates
    (constant within each update's epochs and minibatches) when annealed."""
    per_update = cfg.update_epochs * cfg.num_minibatches

    def rate(count):
        return cfg.lr * (1.0 - (count // per_update) / cfg.num_updates)

    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adam(rate if cfg.anneal_lr else cfg.lr, eps=cfg.adam_eps),
    )


# ----------------------------------------------------------------------------- training


def make_train(cfg: PPOConfig):
    """``train(key) -> (params, metrics)``: the whole run, pure and jittable; ``metrics``
    holds one entry per update [U] (``returns``/``episodes``: the summed returns and
    the count of the episodes that ended in that update's rollout)."""
    env, env_params = make_env(cfg.env)
    discrete, actions = _action_space(env, env_params)
    obs_dim = int(math.prod(env.observation_space(env_params).shape))
    optimizer = make_optimizer(cfg)
    B, T, M = cfg.num_envs, cfg.num_steps, cfg.num_minibatches

    def flat(obs) -> jax.Array:
        return obs.reshape(B, obs_dim).astype(jnp.float32)

    def env_step(carry, _):
        params, env_state, obs_BO, episode_return_B, key = carry
        key, k_action, k_env = jax.random.split(key, 3)
        action, logp_B = sample_action(params, obs_BO, k_action, discrete)
        next_obs, env_state, reward_B, terminated_B, truncated_B, info = jax.vmap(
            env.step, in_axes=(0, 0, 0, None)
        )(jax.random.split(k_env, B), env_state, action, env_params)
        done_B = terminated_B | truncated_B
        episode_return_B = episode_return_B + reward_B
        transition = {
            "obs": obs_BO, "action": action, "logp": logp_B, "reward": reward_B,
            "final_obs": flat(info["final_observation"]), "terminated": terminated_B,
            "done": done_B, "ended_return": jnp.where(done_B, episode_return_B, 0.0),
        }  # fmt: skip
        episode_return_B = jnp.where(done_B, 0.0, episode_return_B)
        return (params, env_state, flat(next_obs), episode_return_B, key), transition

    def learn(params, opt_state, rollout, key):
        # The critic reads the whole rollout at once, off the sequential scan: V(s_t), and
        # V(s'_t) of the state each step reached (before any reset).
        value_TB = jax.vmap(value, in_axes=(None, 0))(params, rollout["obs"])
        next_value_TB = jax.vmap(value, in_axes=(None, 0))(params, rollout["final_obs"])
        advantage_TB, return_TB = losses.gae(
            rollout["reward"], value_TB, next_value_TB, rollout["terminated"], rollout["done"],
            gamma=cfg.gamma, lam=cfg.gae_lambda,
        )  # fmt: skip
        data = {k: rollout[k] for k in ("obs", "action", "logp")}
        data |= {"value": value_TB, "advantage": advantage_TB, "return": return_TB}
        data = jax.tree.map(lambda x: x.reshape(T * B, *x.shape[2:]), data)

        def minibatch_step(state, batch):
            params, opt_state = state
            grads, metrics = jax.grad(ppo_loss, argnums=1, has_aux=True)(
                cfg, params, batch, discrete
            )
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), metrics

        def epoch(state, k):
            order = jax.random.permutation(k, T * B)
            batches = jax.tree.map(lambda x: x[order].reshape(M, -1, *x.shape[1:]), data)
            return jax.lax.scan(minibatch_step, state, batches)

        keys = jax.random.split(key, cfg.update_epochs)
        (params, opt_state), metrics = jax.lax.scan(epoch, (params, opt_state), keys)
        return params, opt_state, jax.tree.map(jnp.mean, metrics)

    def update(carry, _):
        params, opt_state, env_state, obs_BO, episode_return_B, key = carry
        key, k_rollout, k_learn = jax.random.split(key, 3)
        (_, env_state, obs_BO, episode_return_B, _), rollout = jax.lax.scan(
            env_step, (params, env_state, obs_BO, episode_return_B, k_rollout), None, T
        )
        params, opt_state, metrics = learn(params, opt_state, rollout, k_learn)
        metrics |= {
            "returns": jnp.sum(rollout["ended_return"]),
            "episodes": jnp.sum(rollout["done"]),
        }
        return (params, opt_state, env_state, obs_BO, episode_return_B, key), metrics

    def train(key: jax.Array):
        k_params, k_reset, key = jax.random.split(key, 3)
        params = init_params(cfg, k_params, obs_dim, discrete, actions)
        obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(
            jax.random.split(k_reset, B), env_params
        )
        carry = (params, optimizer.init(params), env_state, flat(obs), jnp.zeros(B), key)
        carry, metrics = jax.lax.scan(update, carry, None, cfg.num_updates)
        return carry[0], metrics

    return train


def shard_seeds(keys_S: jax.Array) -> jax.Array:
    """The seeds' keys [S] split over this process's devices, as a batch over a ``data``
    mesh of the most devices that divide S evenly. ``jax.jit(jax.vmap(train))`` then runs
    each device's seeds there, with no communication between devices (seeds share
    nothing). On a CPU split by ``genjax.mesh.split_cpu``, that puts seeds on every core."""
    if keys_S.ndim != 1:
        raise ValueError(
            f"shard_seeds takes one key per seed, shape [S], not {keys_S.shape}; "
            "make them with jax.random.split(key, S)"
        )
    count = math.gcd(len(keys_S), jax.local_device_count())
    mesh = meshlib.make_mesh(f"data={count}", jax.local_devices()[:count])
    return jax.device_put(keys_S, meshlib.batch_sharding(mesh, rank=1))


def episode_returns(metrics: dict, window: int = 1) -> np.ndarray:
    """The mean return of the episodes that ended in each run of ``window`` updates
    [..., U // window] (NaN where none ended), from ``train``'s metrics."""
    returns, episodes = np.asarray(metrics["returns"]), np.asarray(metrics["episodes"])
    U = returns.shape[-1] // window * window
    shape = (*returns.shape[:-1], U // window, window)
    summed = returns[..., :U].reshape(shape).sum(-1)
    count = episodes[..., :U].reshape(shape).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, summed / count, np.nan)


def final_return(metrics: dict, window: int = 10) -> np.ndarray:
    """The mean return of the episodes that ended in the last ``window`` updates (per
    seed when the metrics carry a seed axis)."""
    returns, episodes = np.asarray(metrics["returns"]), np.asarray(metrics["episodes"])
    summed, count = returns[..., -window:].sum(-1), episodes[..., -window:].sum(-1)
    return summed / np.maximum(count, 1)
