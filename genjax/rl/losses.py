"""The pieces of PPO, as pure functions of arrays: advantages, the clipped losses, KL
estimators and the KL controllers. Environments and language models both call them.

Glossary: T time steps (environment steps, or response tokens), B rollouts side by
side (environments, or sequences). A ``mask`` [T, B] marks the entries that count (1)
and padding (0); without one every entry counts.

Advantages by GAE (Schulman et al. 2016) with termination and truncation apart: a
*terminated* step ends the episode for good (its next state is worth 0), a *truncated*
one is cut by a time limit (its next state is worth V(s'), the bootstrap). Either way
the λ-recursion stops there: the next step belongs to another episode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mean(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """The mean of x over the entries where mask is 1 (all of them without a mask)."""
    if mask is None:
        return jnp.mean(x)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1)


def whiten(x: jax.Array, mask: jax.Array | None = None, eps: float = 1e-8) -> jax.Array:
    """x shifted and scaled to mean 0 and std 1 over its (masked) entries."""
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def gae(reward_TB, value_TB, next_value_TB, terminated_TB, done_TB, *, gamma, lam):
    """(advantages [T, B], returns [T, B]) by generalized advantage estimation.

    δ_t = r_t + γ (1 − terminated_t) V(s'_t) − V(s_t), where V(s'_t) = ``next_value`` is
    the value of the state step t reached (before any reset: on truncation, the
    bootstrap). A_t = δ_t + γλ (1 − done_t) A_{t+1}, done = terminated or truncated,
    and A_T = 0 past the rollout's end. The returns, V's regression targets, are A + V.
    """
    not_terminated = 1.0 - terminated_TB.astype(reward_TB.dtype)
    delta_TB = reward_TB + gamma * not_terminated * next_value_TB - value_TB
    carries_TB = gamma * lam * (1.0 - done_TB.astype(reward_TB.dtype))

    def back(next_advantage_B, xs):
        delta_B, carries_B = xs
        advantage_B = delta_B + carries_B * next_advantage_B
        return advantage_B, advantage_B

    _, advantage_TB = jax.lax.scan(
        back, jnp.zeros_like(delta_TB[0]), (delta_TB, carries_TB), reverse=True
    )
    return advantage_TB, advantage_TB + value_TB


def clipped_policy_loss(logp, old_logp, advantage, *, clip: float, mask=None):
    """(loss, metrics): PPO's clipped surrogate −E min(ρA, clip(ρ, 1 ± ε)A), ρ = π/π_old
    (Schulman et al. 2017, Eq. 7), with the fraction of entries clipped and the
    approximate KL(π_old ‖ π) ≈ E[(ρ − 1) − log ρ] (k3 of old against new)."""
    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    unclipped = ratio * advantage
    clipped = jnp.clip(ratio, 1 - clip, 1 + clip) * advantage
    loss = -masked_mean(jnp.minimum(unclipped, clipped), mask)
    metrics = {
        "clip_fraction": masked_mean((jnp.abs(ratio - 1) > clip).astype(logp.dtype), mask),
        "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
    }
    return loss, metrics


def clipped_value_loss(value, old_value, target, *, clip: float | None, mask=None):
    """(loss, metrics): ½ E max((V − R)², (V_clipped − R)²), V_clipped the new value
    kept within ε of the rollout's (PPO's value clipping, as in its baselines); with
    ``clip`` None, ½ E (V − R)². Metrics: the fraction clipped, the squared error."""
    error = jnp.square(value - target)
    if clip is None:
        return 0.5 * masked_mean(error, mask), {"value_error": masked_mean(error, mask)}
    value_clipped = old_value + jnp.clip(value - old_value, -clip, clip)
    error_clipped = jnp.square(value_clipped - target)
    loss = 0.5 * masked_mean(jnp.maximum(error, error_clipped), mask)
    metrics = {
        "value_clip_fraction": masked_mean((error_clipped > error).astype(value.dtype), mask),
        "value_error": masked_mean(error, mask),
    }
    return loss, metrics


def entropy(logits: jax.Array) -> jax.Array:
    """H(softmax(logits)) over the last axis."""
    logp = jax.nn.log_softmax(logits)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


# ----------------------------------------------------------------------------- KL to a reference
# Per-sample estimators of KL(π ‖ π_ref) from x ~ π, by r = π_ref(x) / π(x) (Schulman,
# "Approximating KL divergence", 2020): k1 = −log r, unbiased, can be negative; k3 =
# (r − 1) − log r, unbiased and never negative, lower variance when π is near π_ref.


def kl_k1(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    return logp - ref_logp


def kl_k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    log_r = ref_logp - logp
    return jnp.expm1(log_r) - log_r


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


def adaptive_kl_coef(coef, kl, *, target: float, horizon: float, batch: int):
    """β after one batch with measured KL ``kl``: the proportional controller of Ziegler
    et al. 2019 (Eq. 2): e = clip(KL / target − 1, −0.2, 0.2), β ← β (1 + e · n / H)
    for a batch of n samples and horizon H. KL above target raises β, below lowers it."""
    error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
    return coef * (1.0 + error * batch / horizon)


# ----------------------------------------------------------------------------- sequences
# Language models: a response is the tokens after its prompt; masks mark its real tokens.


def token_logprobs(logits_BTV: jax.Array, tokens_BT: jax.Array, temperature: float = 1.0):
    """log π(token) [B, T] under softmax(logits / temperature): a policy's log-probs must
    be read at the temperature it sampled at, or the PPO ratio starts away from 1."""
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32) / temperature)
    return jnp.take_along_axis(logp_BTV, tokens_BT[..., None], axis=-1)[..., 0]


def sequence_logprob(token_logp_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """log π(response) [B]: the sum of its tokens' log-probs where mask is 1."""
    return jnp.sum(token_logp_BT * mask_BT, axis=-1)


# ----------------------------------------------------------------------------- preferences


def bradley_terry_loss(chosen_B, rejected_B, margin_B=None):
    """(loss, metrics): −E log σ(r_chosen − r_rejected − m), the reward model's
    pairwise loss (Bradley & Terry 1952; InstructGPT, Ouyang et al. 2022), with
    Llama 2's optional margin m per pair (larger for clearer preferences). Metrics: the
    pairwise accuracy (chosen scored higher) and the mean reward gap."""
    gap_B = chosen_B - rejected_B
    shifted_B = gap_B if margin_B is None else gap_B - margin_B
    loss = jnp.mean(jax.nn.softplus(-shifted_B))  # −log σ(x) = softplus(−x)
    metrics = {"accuracy": jnp.mean((gap_B > 0).astype(jnp.float32)), "reward_gap": jnp.mean(gap_B)}
    return loss, metrics


def dpo_loss(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, *, beta: float):
    """(loss, metrics): DPO's −E log σ(β [(log π(y_w) − log π_ref(y_w)) − (log π(y_l) −
    log π_ref(y_l))]) over sequence log-probs (Rafailov et al. 2023, Eq. 7). Metrics:
    the implicit rewards β (log π − log π_ref) of each side, their accuracy and margin."""
    chosen_B = beta * (policy_chosen_B - ref_chosen_B)
    rejected_B = beta * (policy_rejected_B - ref_rejected_B)
    loss, metrics = bradley_terry_loss(chosen_B, rejected_B)
    return loss, {**metrics, "chosen_reward": jnp.mean(chosen_B),
                  "rejected_reward": jnp.mean(rejected_B)}  # fmt: skip


def grpo_advantages(reward_GN: jax.Array, eps: float = 1e-6) -> jax.Array:
    """[G, N]: each of N responses to the same prompt scored against its group, (r −
    mean) / (std + eps) over the group (GRPO, Shao et al. 2024): no critic, the group
    is the baseline. A group whose responses all score alike gets zero advantages."""
    mean_G1 = jnp.mean(reward_GN, axis=-1, keepdims=True)
    std_G1 = jnp.std(reward_GN, axis=-1, keepdims=True)
    return (reward_GN - mean_G1) / (std_G1 + eps)
