"""The PPO pieces of genjax.rl.losses against plain Python and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax.rl import losses


def gae_by_loop(reward, value, next_value, terminated, done, gamma, lam):
    """GAE written as the textbook loop, one environment at a time, backwards."""
    T, B = reward.shape
    advantage = np.zeros((T, B))
    for b in range(B):
        running = 0.0
        for t in reversed(range(T)):
            bootstrap = 0.0 if terminated[t, b] else next_value[t, b]
            delta = reward[t, b] + gamma * bootstrap - value[t, b]
            running = delta + (0.0 if done[t, b] else gamma * lam * running)
            advantage[t, b] = running
    return advantage


def test_gae_equals_the_python_loop_with_termination_and_truncation_apart():
    rng = np.random.default_rng(0)
    T, B = 12, 3
    reward, value, next_value = (rng.normal(size=(T, B)) for _ in range(3))
    terminated = np.zeros((T, B), bool)
    truncated = np.zeros((T, B), bool)
    terminated[3, 0] = terminated[7, 2] = True
    truncated[5, 1] = truncated[9, 0] = True
    done = terminated | truncated
    advantage, returns = losses.gae(
        *map(jnp.asarray, (reward, value, next_value, terminated, done)), gamma=0.9, lam=0.8
    )
    expected = gae_by_loop(reward, value, next_value, terminated, done, 0.9, 0.8)
    np.testing.assert_allclose(advantage, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(returns, expected + value, rtol=1e-5, atol=1e-6)
    # A truncated step bootstraps from V(s'), a terminated one does not.
    assert advantage[9, 0] == pytest.approx(reward[9, 0] + 0.9 * next_value[9, 0] - value[9, 0])
    assert advantage[3, 0] == pytest.approx(reward[3, 0] - value[3, 0])


def test_gae_with_lambda_one_and_no_ends_is_the_discounted_return_minus_value():
    reward = jnp.ones((5, 1))
    value = jnp.zeros((5, 1))
    none = jnp.zeros((5, 1), bool)
    advantage, _ = losses.gae(reward, value, value, none, none, gamma=0.5, lam=1.0)
    np.testing.assert_allclose(advantage[:, 0], [1.9375, 1.875, 1.75, 1.5, 1.0])


def test_clipped_policy_loss_equals_hand_values():
    # ratios 1.5, 0.5, 1.1 with advantages +1, +1, −2 and ε = 0.2:
    # min(1.5, 1.2) = 1.2; min(0.5, 0.8) = 0.5; min(−2.2, −2.2) = −2.2.
    logp = jnp.log(jnp.array([1.5, 0.5, 1.1]))
    loss, metrics = losses.clipped_policy_loss(
        logp, jnp.zeros(3), jnp.array([1.0, 1.0, -2.0]), clip=0.2
    )
    assert float(loss) == pytest.approx(-(1.2 + 0.5 - 2.2) / 3)
    assert float(metrics["clip_fraction"]) == pytest.approx(2 / 3)
    kl = np.mean([r - 1 - np.log(r) for r in (1.5, 0.5, 1.1)])
    assert float(metrics["approx_kl"]) == pytest.approx(kl, rel=1e-5)
    # A mask drops the third entry.
    masked, _ = losses.clipped_policy_loss(
        logp, jnp.zeros(3), jnp.array([1.0, 1.0, -2.0]), clip=0.2, mask=jnp.array([1, 1, 0])
    )
    assert float(masked) == pytest.approx(-(1.2 + 0.5) / 2)


def test_clipped_value_loss_equals_hand_values():
    # old 0, targets 1: new 0.5 (inside ε = 0.2: clipped 0.2, error (0.2 − 1)² = 0.64 wins
    # over 0.25) and new 1.0 (clipped 0.2: 0.64 against 0).
    value, old, target = jnp.array([0.5, 1.0]), jnp.zeros(2), jnp.ones(2)
    loss, metrics = losses.clipped_value_loss(value, old, target, clip=0.2)
    assert float(loss) == pytest.approx(0.5 * (0.64 + 0.64) / 2)
    assert float(metrics["value_clip_fraction"]) == 1.0
    plain, _ = losses.clipped_value_loss(value, old, target, clip=None)
    assert float(plain) == pytest.approx(0.5 * (0.25 + 0.0) / 2)


def test_kl_estimators_are_unbiased_and_k3_is_never_negative():
    p = jnp.array([0.5, 0.3, 0.2])
    q = jnp.array([0.2, 0.3, 0.5])
    exact = float(jnp.sum(p * jnp.log(p / q)))
    x = jax.random.categorical(jax.random.key(0), jnp.log(p), shape=(400_000,))
    logp, logq = jnp.log(p)[x], jnp.log(q)[x]
    k1, k3 = losses.kl_k1(logp, logq), losses.kl_k3(logp, logq)
    # Standard errors here are about 0.0013 (k1) and 0.0009 (k3).
    assert float(jnp.mean(k1)) == pytest.approx(exact, abs=0.006)
    assert float(jnp.mean(k3)) == pytest.approx(exact, abs=0.006)
    assert float(jnp.min(k3)) >= 0
    assert float(jnp.min(k1)) < 0  # k1 alone can be negative
    assert float(jnp.var(k3)) < float(jnp.var(k1))


def test_adaptive_kl_coefficient_moves_toward_its_target():
    coef = 0.1
    up = losses.adaptive_kl_coef(coef, 12.0, target=6.0, horizon=10_000, batch=512)
    down = losses.adaptive_kl_coef(coef, 3.0, target=6.0, horizon=10_000, batch=512)
    same = losses.adaptive_kl_coef(coef, 6.0, target=6.0, horizon=10_000, batch=512)
    assert float(up) == pytest.approx(0.1 * (1 + 0.2 * 512 / 10_000))  # error clipped at 0.2
    assert float(down) == pytest.approx(0.1 * (1 - 0.2 * 512 / 10_000))
    assert float(same) == pytest.approx(0.1)
    # Run as a loop against a KL that falls as β rises, it settles where KL = target.
    for _ in range(3000):
        kl = 1.2 / coef  # KL(β): larger β, smaller KL
        coef = losses.adaptive_kl_coef(coef, kl, target=6.0, horizon=10_000, batch=512)
    assert 1.2 / float(coef) == pytest.approx(6.0, rel=0.02)


def test_whiten_and_masked_mean():
    x = jnp.array([1.0, 2.0, 3.0, 100.0])
    mask = jnp.array([1, 1, 1, 0])
    assert float(losses.masked_mean(x, mask)) == 2.0
    w = losses.whiten(x, mask)
    assert float(losses.masked_mean(w, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.masked_mean(w**2, mask)) == pytest.approx(1.0, rel=1e-4)
    np.testing.assert_allclose(losses.entropy(jnp.zeros(4)), np.log(4), rtol=1e-6)


# ----------------------------------------------------------------------------- preferences


def test_token_logprobs_read_the_sampling_temperature():
    logits = jnp.array([[[2.0, 0.0, -1.0]]])
    tokens = jnp.array([[0]])
    at_half = losses.token_logprobs(logits, tokens, temperature=0.5)
    expected = 4.0 - np.log(np.exp(4.0) + 1 + np.exp(-2.0))
    assert float(at_half[0, 0]) == pytest.approx(expected, rel=1e-6)
    mask = jnp.array([[1.0, 1.0, 0.0]])
    assert float(losses.sequence_logprob(jnp.array([[-1.0, -2.0, -5.0]]), mask)[0]) == -3.0


def test_dpo_loss_equals_its_closed_form():
    pc, pr = jnp.array([-3.0, -5.0]), jnp.array([-4.0, -2.0])
    rc, rr = jnp.array([-3.5, -5.0]), jnp.array([-3.0, -2.5])
    beta = 0.1
    loss, metrics = losses.dpo_loss(pc, pr, rc, rr, beta=beta)
    logits = beta * ((pc - rc) - (pr - rr))  # [0.15, -0.05]
    expected = -np.mean(np.log(1 / (1 + np.exp(-np.asarray(logits)))))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["accuracy"]) == 0.5
    assert float(metrics["chosen_reward"]) == pytest.approx(beta * np.mean([0.5, 0.0]))


def test_reward_model_loss_learns_separable_pairs():
    # Chosen and rejected differ along a hidden direction w*; a linear reward r(x) = w·x
    # trained on the Bradley–Terry loss separates held-out pairs.
    rng = np.random.default_rng(0)
    w_star = rng.normal(size=8)
    x = rng.normal(size=(600, 2, 8))
    order = (x @ w_star)[:, 0] > (x @ w_star)[:, 1]
    chosen = np.where(order[:, None], x[:, 0], x[:, 1])
    rejected = np.where(order[:, None], x[:, 1], x[:, 0])
    train, test = slice(0, 500), slice(500, None)

    def loss_fn(w, c, r):
        return losses.bradley_terry_loss(c @ w, r @ w)

    w = jnp.zeros(8)
    start, _ = loss_fn(w, chosen[train], rejected[train])
    assert float(start) == pytest.approx(np.log(2))  # a constant reward: chance
    grad = jax.jit(jax.grad(lambda w: loss_fn(w, chosen[train], rejected[train])[0]))
    for _ in range(300):
        w = w - 0.5 * grad(w)
    end, _ = loss_fn(w, chosen[train], rejected[train])
    _, held_out = loss_fn(w, chosen[test], rejected[test])
    assert float(end) < 0.3 * float(start)
    assert float(held_out["accuracy"]) >= 0.95
    # A margin asks for a larger gap: the same rewards lose more.
    with_margin, _ = losses.bradley_terry_loss(chosen @ w, rejected @ w, jnp.full(600, 1.0))
    plain, _ = losses.bradley_terry_loss(chosen @ w, rejected @ w)
    assert float(with_margin) > float(plain)


def test_grpo_advantages_are_standardized_within_each_group():
    reward = jnp.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    adv = losses.grpo_advantages(reward)
    np.testing.assert_allclose(adv[0], [1, -1, -1, 1], rtol=1e-5)
    np.testing.assert_allclose(adv[1], 0.0)  # all alike: nothing to learn from the group
