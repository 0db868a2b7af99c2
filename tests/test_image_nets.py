"""Image denoisers (genjax.nn.unet, genjax.nn.dit) and their conditioning
(genjax.nn.conditioning): shapes, dependence on every input, padding masked,
logical axes on every parameter, sharded forward equal to one device, and the
U-Net's parameter count against Hugging Face diffusers' UNet2DModel; the labels
of the MLP denoiser (genjax.nn.mlp) of 2-D points and latents."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genjax import mesh as meshlib
from genjax.nn import conditioning
from genjax.nn.dit import DiT, DiTConfig
from genjax.nn.mlp import NoiseMLP
from genjax.nn.unet import UNet, UNetConfig

# The axis vocabulary of the image networks and the rules their docstrings recommend.
RULES: meshlib.Rules = {
    "batch": meshlib.BATCH_AXES,
    "conv_h": None,
    "conv_w": None,
    "channels_in": None,
    "channels": "fsdp",
    "embed": "fsdp",
    "heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": None,
    "seq": None,
}
TINY = {
    "unet": (
        UNet,
        UNetConfig(channels=8, groups=4, embed=16, heads=2, num_classes=3, text=True,
                   text_width=16, text_len=6),
    ),
    "dit": (
        DiT,
        DiTConfig(width=16, depth=2, heads=2, mlp_ratio=2, num_classes=3, text=True,
                  text_width=16, text_len=6),
    ),
}  # fmt: skip
MESHES = {"unet": "data=4,fsdp=2", "dit": "data=2,fsdp=2,tensor=2"}
B = 8


def split(module: nnx.Module):
    """(graphdef, params, axes): the module as a pure pytree and its logical axes."""
    graphdef, state = nnx.split(module)
    flat = {path: var.get_metadata()["axes"] for path, var in nnx.to_flat_state(state)}
    return graphdef, nnx.to_pure_dict(state), nnx.to_pure_dict(nnx.from_flat_state(flat))


def count(module: nnx.Module) -> int:
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


def randomized(make, seed: int = 0, std: float = 0.2) -> nnx.Module:
    """The module ``make`` builds, every parameter drawn from N(0, std²) on the host
    (no per-shape compiles of the initializers; zero-initialized outputs and gates
    would hide every dependence)."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda v: jnp.asarray(std * rng.standard_normal(v.shape), v.dtype), state)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request):
    """A tiny randomized network with every conditioning input, as a pure params
    pytree, its axes, and its forward (plain and jitted)."""
    cls, cfg = TINY[request.param]
    graphdef, params, axes = split(randomized(lambda: cls(cfg, rngs=nnx.Rngs(0))))

    def forward(params, x, noise, label=None, text=None):
        return nnx.merge(graphdef, params)(x, noise, label, text)

    return request.param, cfg, params, axes, forward, jax.jit(forward)


def inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((B, 8, 8, 1)), jnp.float32)
    noise = jnp.asarray(rng.uniform(-1, 1, B), jnp.float32)
    label = jnp.asarray(rng.integers(0, 3, B), jnp.int32)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
    return x, noise, label, jnp.asarray(conditioning.encode_text(words, 5))


def test_output_has_the_input_shape_and_depends_on_every_input(tiny):
    _, cfg, params, _, _, f = tiny
    x, noise, label, text = inputs()
    out = f(params, x, noise, label, text)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))

    def changed(other):
        return float(jnp.min(jnp.max(jnp.abs(other - out), axis=(1, 2, 3))))

    assert changed(f(params, x, noise + 0.5, label, text)) > 1e-3
    assert changed(f(params, x, noise, (label + 1) % cfg.num_classes, text)) > 1e-3
    assert changed(f(params, x, noise, label, jnp.roll(text, 1, axis=0))) > 1e-3


def test_padding_is_masked_and_none_is_the_null_condition(tiny):
    _, cfg, params, _, _, f = tiny
    x, noise, label, text = inputs()
    out = f(params, x, noise, label, text)
    longer = jnp.pad(text, ((0, 0), (0, cfg.text_len - text.shape[1])))  # more padding
    np.testing.assert_allclose(f(params, x, noise, label, longer), out, rtol=1e-5, atol=1e-5)

    # None is the null condition: the null label, and the empty text, which adds 0.
    null = f(params, x, noise, jnp.full_like(label, cfg.num_classes), jnp.zeros_like(text))
    assert bool(jnp.all(jnp.isfinite(null)))
    np.testing.assert_allclose(f(params, x, noise), null, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        # One level: few parameter shapes, few initializer compiles.
        lambda: UNet(UNetConfig(channels=8, channel_mult=(1,), attention_levels=(0,),
                                groups=4, embed=16, heads=2), rngs=nnx.Rngs(0)),
        lambda: DiT(DiTConfig(width=16, depth=1, heads=2), rngs=nnx.Rngs(0)),
    ],
    ids=["unet", "dit"],
)  # fmt: skip
def test_a_fresh_network_outputs_zero(make):
    x, noise, _, _ = inputs()
    out = jax.jit(lambda x, noise: make()(x, noise))(x, noise)
    np.testing.assert_array_equal(out, 0.0)  # zero-initialized output layer


def test_sharded_forward_equals_one_device(tiny):
    name, _, params, axes, forward, f = tiny
    args = inputs()
    expected = f(params, *args)
    mesh = meshlib.make_mesh(MESHES[name])
    param_shardings = meshlib.tree_shardings(axes, params, mesh, RULES)
    batch = [meshlib.batch_sharding(mesh, a.ndim) for a in args]
    sharded = jax.jit(forward, in_shardings=(param_shardings, *batch))
    got = sharded(jax.device_put(params, param_shardings), *args)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "module",
    [
        lambda: UNet(UNetConfig(num_classes=10, text=True), rngs=nnx.Rngs(0)),
        lambda: DiT(DiTConfig(num_classes=10, text=True), rngs=nnx.Rngs(0)),
    ],
    ids=["unet", "dit"],
)
def test_every_parameter_has_logical_axes_of_its_rank(module):
    _, params, axes = split(nnx.eval_shape(module))
    for path, value in jax.tree_util.tree_leaves_with_path(params):
        names = axes
        for key in path:
            names = names[key.key]
        assert isinstance(names, tuple) and len(names) == len(value.shape), path
        assert set(names) - {None} <= set(RULES), (path, names)
        assert value.dtype == jnp.float32


def diffusers_unet2d_params(blocks=(32, 64), layers=1, attention=(False, True), groups_ch=1):
    """Parameters of diffusers' UNet2DModel(block_out_channels=blocks,
    layers_per_block=layers, in/out_channels=groups_ch), AttnDown/AttnUp blocks
    where ``attention``, counted from its layers (diffusers 0.3x, unet_2d.py and
    unet_2d_blocks.py): TimestepEmbedding(blocks[0] → 4·blocks[0] → same);
    ResnetBlock2D = norm1, conv1, time_emb_proj, norm2, conv2 (+ 1×1 conv_shortcut
    when channels change); Attention = group_norm, to_q, to_k, to_v, to_out (biases);
    Downsample2D/Upsample2D = one 3×3 conv; up blocks have layers + 1 resnets."""
    temb = 4 * blocks[0]
    conv = lambda i, o, k=3: k * k * i * o + o
    lin = lambda i, o: i * o + o
    resnet = lambda i, o: (
        2 * i + conv(i, o) + lin(temb, o) + 2 * o + conv(o, o) + (conv(i, o, 1) if i != o else 0)
    )
    attn = lambda c: 2 * c + 4 * lin(c, c)
    n = lin(blocks[0], temb) + lin(temb, temb) + conv(groups_ch, blocks[0])
    out = blocks[0]
    for i, out in enumerate(blocks):  # down: resnets (+ attentions), then a downsample
        inp = blocks[max(i - 1, 0)]
        for j in range(layers):
            n += resnet(inp if j == 0 else out, out) + (attn(out) if attention[i] else 0)
        n += conv(out, out) if i < len(blocks) - 1 else 0
    n += 2 * resnet(out, out) + attn(out)  # UNetMidBlock2D
    rev = blocks[::-1]
    prev = rev[0]
    for i, out in enumerate(rev):  # up: resnet_in + res_skip channels, as diffusers' loop
        inp = rev[min(i + 1, len(rev) - 1)]
        for j in range(layers + 1):
            skip = inp if j == layers else out
            n += resnet((prev if j == 0 else out) + skip, out)
            n += attn(out) if attention[::-1][i] else 0
        n += conv(out, out) if i < len(rev) - 1 else 0
        prev = out
    return n + 2 * blocks[0] + conv(blocks[0], groups_ch)


def test_default_unet_has_the_parameter_count_of_its_diffusers_peer():
    peer = diffusers_unet2d_params()
    assert peer == 701_345  # by hand: 20,736 time embedding + 320 conv_in + 32,000 + 82,752
    # down + 181,504 mid + 305,152 + 78,528 up + 353 out
    ours = count(nnx.eval_shape(lambda: UNet(UNetConfig(), rngs=nnx.Rngs(0))))
    print(f"UNet default: {ours:,} parameters; diffusers UNet2DModel peer: {peer:,}")
    assert abs(ours - peer) <= 0.05 * peer


def test_cross_attention_masks_padding_and_gives_zero_without_keys():
    attn = randomized(
        lambda: conditioning.CrossAttention(8, 6, 2, axis="embed", zero_out=False, rngs=nnx.Rngs(0))
    )
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((2, 4, 6)), jnp.float32)
    mask = jnp.array([[True, True, False, False], [False, False, False, False]])
    f = jax.jit(lambda context: attn(x, context, mask))
    out = f(context)
    assert float(jnp.abs(out[0]).min()) > 0
    np.testing.assert_array_equal(out[1], 0.0)  # a row without keys: exactly 0
    changed = context.at[:, 2:].set(100.0)  # values behind the mask
    np.testing.assert_allclose(f(changed), out, rtol=1e-6)
    grads = jax.jit(jax.grad(lambda c: jnp.sum(f(c) ** 2)))(context)
    assert bool(jnp.all(jnp.isfinite(grads))) and float(jnp.abs(grads[:, 2:]).max()) == 0.0


def test_label_embedding_has_a_null_row():
    embed = randomized(lambda: conditioning.LabelEmbedding(3, 4, rngs=nnx.Rngs(0)))
    assert embed.null == 3 and embed.table_CE.shape == (4, 4)
    rows = embed(jnp.arange(4))
    assert not np.allclose(rows[3], rows[:3])


def test_encode_text_is_bytes_plus_one_zero_padded():
    np.testing.assert_array_equal(
        conditioning.encode_text(["ab", "", "é"], 3),
        [[98, 99, 0], [0, 0, 0], [0xC3 + 1, 0xA9 + 1, 0]],
    )
    with pytest.raises(ValueError, match="is 4 UTF-8 bytes; the text encoder reads at most 3"):
        conditioning.encode_text(["four"], 3)


def test_bad_configs_and_inputs_are_clear_errors():
    with pytest.raises(
        ValueError, match=r"attention level 2 does not exist; the levels are 0\.\.1"
    ):
        UNetConfig(attention_levels=(2,))
    with pytest.raises(ValueError, match="groups=8 must divide 12 channels"):
        UNetConfig(channels=12)
    with pytest.raises(ValueError, match="groups=8 must divide channels=12"):
        UNetConfig(channels=12, channel_mult=(2, 4), heads=4)
    with pytest.raises(ValueError, match="heads=3 must divide width=128"):
        DiTConfig(heads=3)
    dit = randomized(lambda: DiT(DiTConfig(width=8, depth=1, heads=2), rngs=nnx.Rngs(0)))
    x, noise = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,))
    with pytest.raises(ValueError, match="got labels but the config has num_classes=0"):
        dit(x, noise, jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="must divide by the patch 2"):
        dit(jnp.zeros((1, 7, 8, 1)), noise)


def test_noise_mlp_reads_labels_and_none_is_the_null_label():
    net = randomized(lambda: NoiseMLP(4, 16, 2, 8, num_classes=3, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((B, 4)), jnp.float32)
    noise = jnp.asarray(rng.uniform(-1, 1, B), jnp.float32)
    label = jnp.asarray(rng.integers(0, 3, B), jnp.int32)
    out = net(x, noise, label)
    assert out.shape == x.shape
    assert float(jnp.min(jnp.max(jnp.abs(net(x, noise, (label + 1) % 3) - out), -1))) > 1e-3
    np.testing.assert_allclose(net(x, noise), net(x, noise, jnp.full_like(label, 3)), rtol=1e-6)
    unlabelled = randomized(lambda: NoiseMLP(4, 16, 2, 8, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="num_classes=0"):
        unlabelled(x, noise, label)
