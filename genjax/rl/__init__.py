"""Reinforcement learning: the PPO losses every policy shares (``genjax.rl.losses``) and
PPO for any jittable environment (``genjax.rl.ppo``)."""
