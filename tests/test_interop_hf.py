"""Hugging Face Llama interop: logits parity with transformers, bit-exact round
trips, the safetensors reader's defences, clear errors, and the CLI on a real run."""

import dataclasses
import json
import pathlib
import shlex
import struct
import sysconfig

import jax
import ml_dtypes
import numpy as np
import pytest

from genjax import lm, run, score
from genjax.interop import hf
from genjax.interop import safetensors as st
from genjax.models import transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = transformer.get_preset("tiny")
# transformers' logits equal ours to float32 rounding: measured max |diff| <= 4e-6 at
# logits of std ~0.9; a RoPE, GQA or layout mistake gives differences of order 1.
LOGITS_ATOL = 2e-5


def _random_params(cfg: transformer.Config, seed: int = 0, std: float = 0.1) -> dict:
    """Gaussian parameters (numpy, no init compile), norm scales around 1 but not 1,
    so a misplaced norm shows in the logits."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        x = rng.normal(size=leaf.shape)
        x = 1.0 + 0.3 * x if path[-1].key == "scale" else std * x
        return x.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, transformer.abstract_params(cfg))


def _hf_folder(tmp_path, cfg=TINY, name="hf") -> pathlib.Path:
    out = tmp_path / name
    hf.write_hf(out, cfg, _random_params(cfg))
    return out


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "cfg",
    [
        # GQA (4 query heads, 2 kv heads), tied embeddings.
        TINY,
        # Untied head; N·K = 32 != D = 64; non-default RoPE theta and norm epsilon.
        dataclasses.replace(
            TINY, tie_embeddings=False, head_dim=8, rope_theta=500.0, norm_eps=1e-6
        ),
    ],
    ids=["tied-gqa", "untied-narrow-heads"],
)
def test_exported_model_gives_transformers_the_same_logits(tmp_path, cfg):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    params = _random_params(cfg)
    hf.write_hf(tmp_path, cfg, params)
    model = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    )
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.max_seq_len))
    ours = np.asarray(jax.jit(transformer.forward, static_argnums=0)(cfg, params, tokens))
    with torch.no_grad():
        theirs = model(torch.from_numpy(tokens)).logits.numpy()
    assert ours.std() > 0.5  # not trivially equal near-zero logits
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=LOGITS_ATOL)


def test_batched_greedy_decoding_equals_transformers_generate_of_each_prompt(tmp_path):
    """The whole decoding path (left padding, positions, KV cache, GQA, the loop)
    against an independent implementation: one genjax batch of prompts of three
    lengths, and transformers' greedy ``generate`` of each prompt alone."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from genjax.sampling import decode

    params = _random_params(TINY)
    hf.write_hf(tmp_path, TINY, params)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, TINY.vocab_size, n).tolist() for n in (3, 11, 7)]
    new = 16
    eos = 2  # both stop there; genjax leaves it out of its tokens, transformers keeps it
    ours = decode.generate(TINY, params, prompts, max_new_tokens=new, eos_id=eos)
    for prompt, tokens, why in zip(prompts, ours.tokens, ours.finish_reasons, strict=True):
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=new,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=0,
            )
        assert tokens + ([eos] if why == "eos" else []) == out[0, len(prompt) :].tolist()
    assert len({tuple(t) for t in ours.tokens}) == len(prompts)  # not one degenerate repetition


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "cfg",
    [
        dataclasses.replace(TINY, tie_embeddings=False),
        dataclasses.replace(TINY, param_dtype="bfloat16"),
    ],
    ids=["f32-untied", "bf16-tied"],
)
def test_export_import_export_is_bit_identical(tmp_path, cfg):
    params = _random_params(cfg)
    hf.write_hf(tmp_path / "a", cfg, params)
    cfg2, params2 = hf.read_hf(tmp_path / "a")
    hf.write_hf(tmp_path / "b", cfg2, params2)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert cfg2 == cfg
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), y)


def test_float32_rope_buffers_of_a_bfloat16_checkpoint_leave_it_bfloat16(tmp_path):
    """Older transformers saved each layer's inv_freq (float32); import drops them."""
    cfg = dataclasses.replace(TINY, param_dtype="bfloat16")
    hf.write_hf(tmp_path, cfg, _random_params(cfg))
    tensors = st.load(tmp_path / "model.safetensors")
    inv_freq = np.ones(cfg.head_dim // 2, np.float32)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = inv_freq
    st.save(tmp_path / "model.safetensors", tensors)
    cfg2, params = hf.read_hf(tmp_path)
    assert cfg2.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}


@pytest.mark.parametrize("tie", [True, False])
def test_folder_saved_by_transformers_imports_bit_exactly(tmp_path, tie):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12,
        max_position_embeddings=32, rms_norm_eps=1e-5, tie_word_embeddings=tie,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    # The untied model is saved in shards, read through model.safetensors.index.json.
    model.save_pretrained(tmp_path, max_shard_size="1GB" if tie else "100KB")
    assert (tmp_path / "model.safetensors.index.json").exists() == (not tie)

    cfg, params = hf.read_hf(tmp_path)
    assert (cfg.d_model, cfg.num_kv_heads, cfg.head_dim, cfg.tie_embeddings) == (48, 2, 12, tie)
    reexported = hf.to_hf_tensors(cfg, params)
    reference = {k: v.numpy() for k, v in model.state_dict().items()}
    if tie:
        del reference["lm_head.weight"]  # the embedding, read from it by both
    assert reexported.keys() == reference.keys()
    for name, tensor in reference.items():
        assert reexported[name].dtype == tensor.dtype
        assert reexported[name].tobytes() == tensor.tobytes(), name


# ----------------------------------------------------------------------------- safetensors


def _example_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.normal(size=(3, 5)).astype(np.float32),
        "bf16": rng.normal(size=(4, 2)).astype(ml_dtypes.bfloat16),
        "f16": rng.normal(size=(7,)).astype(np.float16),
        "i32": np.arange(6, dtype=np.int32).reshape(2, 3),
        "a_i64": np.array([-1, 2**40], np.int64),
        "scalar": np.float32(2.5).reshape(()),
    }


def test_safetensors_round_trip_is_exact_and_deterministic(tmp_path):
    tensors = _example_tensors()
    st.save(tmp_path / "a.safetensors", tensors)
    st.save(tmp_path / "b.safetensors", dict(reversed(list(tensors.items()))))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    loaded = st.load(tmp_path / "a.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, x in tensors.items():
        assert loaded[name].dtype == x.dtype and loaded[name].shape == x.shape
        assert loaded[name].tobytes() == x.tobytes(), name


def test_safetensors_agrees_with_the_reference_implementation(tmp_path):
    torch = pytest.importorskip("torch")
    reference = pytest.importorskip("safetensors.torch")
    ours = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, ml_dtypes.bfloat16)}
    st.save(tmp_path / "ours.safetensors", ours)
    theirs = reference.load_file(tmp_path / "ours.safetensors")
    assert theirs["w"].tolist() == ours["w"].tolist() and theirs["b"].dtype == torch.bfloat16

    reference.save_file(
        {"x": torch.randn(3, 4, dtype=torch.bfloat16), "y": torch.arange(5)},
        tmp_path / "theirs.safetensors",
    )
    back = st.load(tmp_path / "theirs.safetensors")
    assert back["x"].dtype == ml_dtypes.bfloat16 and back["y"].dtype == np.int64
    x = reference.load_file(tmp_path / "theirs.safetensors")["x"]
    assert back["x"].tobytes() == x.view(torch.int16).numpy().tobytes()


def _corrupt(tmp_path, edit) -> pathlib.Path:
    path = tmp_path / "t.safetensors"
    st.save(path, {"a": np.ones((4, 4), np.float32), "b": np.zeros(3, np.float32)})
    path.write_bytes(edit(path.read_bytes()))
    return path


def _with_header(raw: bytes, change) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    header = change(json.loads(raw[8 : 8 + n]))
    return _with_header_text(raw, json.dumps(header).encode())


def _with_header_text(raw: bytes, text: bytes) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


def _header_naming_b_twice(raw: bytes) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + n].decode()
    b = json.dumps(json.loads(text)["b"])
    return _with_header_text(raw, text.rstrip()[:-1].encode() + f', "b": {b}}}'.encode())


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda raw: raw[:-4], r"'b': data_offsets \[64, 76\] point outside the 72 data bytes"),
        (lambda raw: raw[:5], "too short"),
        (lambda raw: struct.pack("<Q", 10**6) + raw[8:], "header length 1000000 points past"),
        (lambda raw: raw[:8] + b"x" + raw[9:], "header is not valid JSON"),
        (
            lambda raw: _with_header(raw, lambda h: {**h, "a": {**h["a"], "shape": [4, 5]}}),
            r"'a': F32 \(4, 5\) needs 80 bytes, but data_offsets \[0, 64\] hold 64",
        ),
        (
            lambda raw: _with_header(raw, lambda h: {**h, "a": {**h["a"], "dtype": "F8_E4M3"}}),
            "'a': dtype 'F8_E4M3' is not supported",
        ),
        (
            lambda raw: _with_header(
                raw, lambda h: {**h, "b": {**h["b"], "data_offsets": [4, 16]}}
            ),
            "tensors overlap or leave a gap",
        ),
        (
            lambda raw: _with_header(raw, lambda h: {**h, "a": {**h["a"], "dtype": ["F32"]}}),
            r"t.safetensors: tensor 'a': dtype \['F32'\] is not supported",
        ),
        (lambda raw: _with_header_text(raw, b"[" * 100_000 + b"]" * 100_000), "JSON object"),
        (
            lambda raw: _with_header_text(raw, b'{"c": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
            "not valid JSON",
        ),
        (_header_naming_b_twice, "header names 'b' twice"),
        (lambda raw: _with_header(raw, lambda h: {**h, "__metadata__": []}), "__metadata__"),
    ],
    ids=[
        *("truncated", "tiny", "header-length", "json", "size", "dtype", "overlap"),
        *("dtype-list", "nested", "nested-in-object", "duplicate", "metadata-list"),
    ],
)
def test_safetensors_reader_rejects_bad_files_clearly(tmp_path, edit, match):
    with pytest.raises(st.SafetensorsError, match=match):
        st.load(_corrupt(tmp_path, edit))


def test_bad_metadata_leaves_no_file_behind(tmp_path):
    with pytest.raises(st.SafetensorsError):
        st.save(tmp_path / "t.safetensors", {"a": np.ones(2, np.float32)}, metadata={"a": 1})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- clear errors


def _rewrite_tensors(folder: pathlib.Path, change) -> None:
    tensors = dict(st.load(folder / "model.safetensors"))
    change(tensors)
    st.save(folder / "model.safetensors", tensors)


def test_wrong_shape_missing_and_unexpected_tensors_are_named(tmp_path):
    folder = _hf_folder(tmp_path)

    def change(t):
        t["model.layers.1.self_attn.k_proj.weight"] = t["model.layers.1.self_attn.k_proj.weight"].T
        del t["model.layers.0.mlp.up_proj.weight"]
        t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)

    _rewrite_tensors(folder, change)
    with pytest.raises(ValueError) as e:
        hf.read_hf(folder)
    message = str(e.value)
    assert (
        "model.layers.1.self_attn.k_proj.weight: expected shape (32, 64), got (64, 32)" in message
    )
    assert "model.layers.0.mlp.up_proj.weight: missing" in message
    assert "model.layers.0.self_attn.q_proj.bias: unexpected tensor" in message


@pytest.mark.parametrize(
    "weight_map, match",
    [
        ([], "weight_map must map tensor names to shard file names"),
        ({"a": 1}, "weight_map must map tensor names to shard file names"),
        ({"a": ".."}, r"shard '\.\.' is not a file name in the folder"),
        ({"a": "../x.safetensors"}, "is not a file name in the folder"),
    ],
)
def test_a_shard_index_is_read_only_within_its_folder(tmp_path, weight_map, match):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=match):
        hf.read_hf_tensors(tmp_path)


def test_tied_head_is_accepted_only_if_it_is_the_embedding(tmp_path):
    folder = _hf_folder(tmp_path)
    _, params = hf.read_hf(folder)
    _rewrite_tensors(folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
    _, with_head = hf.read_hf(folder)  # some writers keep a tied head: same parameters
    assert jax.tree.all(jax.tree.map(np.array_equal, params, with_head))
    _rewrite_tensors(folder, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
    with pytest.raises(ValueError, match=r"lm_head\.weight differs from model\.embed_tokens"):
        hf.read_hf(folder)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"architectures": ["MistralForCausalLM"]}, r"architectures \['MistralForCausalLM'\]"),
        ({"model_type": "gpt2"}, "model_type 'gpt2'"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"mlp_bias": True}, "mlp_bias=true"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"hidden_size": "64"}, "hidden_size must be an integer"),
        ({"rope_parameters": "default"}, "rope_parameters must be an object"),
        ({"rope_theta": [1]}, r"rope_theta must be a positive number, got \[1\]"),
        ({"rms_norm_eps": "abc"}, "rms_norm_eps must be a positive number"),
        ({"rms_norm_eps": -1}, "rms_norm_eps must be a positive number"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, change, match):
    folder = _hf_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=match):
        hf.read_hf(folder)


def test_pickle_checkpoints_are_not_read(tmp_path):
    folder = _hf_folder(tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin is pickle"):
        hf.read_hf(folder)


def test_import_refuses_a_tokenizer_that_is_not_genjax(tmp_path, capsys):
    folder = _hf_folder(tmp_path)
    (folder / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    code = hf.main(["import", "--hf", str(folder), "--workdir", str(tmp_path / "run")])
    assert code == 2
    assert "is not a valid sentencepiece model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written before every check passed


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[pathlib.Path, lm.PretrainConfig]:
    """A real (two-step) genjax run on a few stdlib modules."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    corpus = tuple(str(p) for p in sorted((stdlib / "json").glob("*.py")))
    cfg = lm.PretrainConfig(
        model=dataclasses.replace(TINY, vocab_size=384),
        data=lm.DataConfig(corpus=corpus, val_fraction=0.0, seq_len=32, global_batch_size=8),
        run=run.RunConfig(steps=2),
    )
    workdir = tmp_path_factory.mktemp("run")
    run.train(cfg, workdir, lm.FAMILY)
    return workdir, cfg


def test_cli_export_import_scores_and_resumes(trained_run, tmp_path, capsys):
    workdir, cfg = trained_run
    hf_dir, new = tmp_path / "hf", tmp_path / "imported"
    assert hf.main(["export", "--workdir", str(workdir), "--out", str(hf_dir)]) == 0
    assert {p.name for p in hf_dir.iterdir()} == {
        "config.json", "model.safetensors", "tokenizer.model",
        "tokenizer_config.json", "special_tokens_map.json",
    }  # fmt: skip

    data = cfg.data
    args = [
        "import", "--hf", str(hf_dir), "--workdir", str(new), "--seq-len", str(data.seq_len),
        "--set", f"data.corpus={data.corpus!r}", "data.val_fraction=0",
        f"data.global_batch_size={data.global_batch_size}", "run.mesh=data=2,fsdp=2,tensor=2",
    ]  # fmt: skip
    assert hf.main(args) == 0
    printed = capsys.readouterr().out
    assert hf.main([*args[:3], "--workdir", str(workdir)]) == 2  # never over another run
    assert "already holds a run" in capsys.readouterr().err

    # The imported run holds exactly the exported parameters, and scores the same.
    a, b = lm.load(workdir), lm.load(new)
    assert (b.cfg.model, b.cfg.data.seq_len) == (a.cfg.model, a.cfg.data.seq_len)
    assert (a.step, b.step) == (cfg.run.steps, 0)
    assert b.tokenizer.model_proto == a.tokenizer.model_proto
    tok_a = a.tokenizer
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    target = str(pathlib.Path(data.corpus[0]))
    bits = []
    for run_dir in (workdir, new):
        assert score.main(["--workdir", str(run_dir), target]) == 0
        bits.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert bits[0] == bits[1] and bits[0].startswith("bits_per_byte=")

    # The printed command resumes it: the script's config matches the checkpoint's.
    command = next(line for line in printed.splitlines() if "lm_pretrain.py" in line)
    argv = [*shlex.split(command)[2:], "--steps", "1"]  # after "python experiments/..."
    resumed_cfg = run.config_from_args(lm.FAMILY, run.parser(lm.FAMILY).parse_args(argv))
    assert (resumed_cfg.model, resumed_cfg.data) == (b.cfg.model, data)
    result = run.train(resumed_cfg, new, lm.FAMILY)
    assert int(result.state.step) == 1
    assert "resumed from step 0" in capsys.readouterr().out

    # transformers' tokenizer from the exported folder gives genjax's ids after <eod>.
    transformers = pytest.importorskip("transformers")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    source = pathlib.Path(data.corpus[0]).read_text()
    for text in (source, "text <eod> more <unk><pad>"):  # special tokens' names are text
        assert hf_tokenizer(text)["input_ids"] == [tok_a.eos_id, *tok_a.encode(text)]


def test_trained_run_parity_script_agrees_with_transformers(trained_run, capsys, load_script):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    module = load_script("experiments/benchmarks/trained_run_parity.py")
    workdir, _ = trained_run
    assert module.main(["--workdir", str(workdir), "--new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("| True | True | ") == len(module.PROMPTS), out
    assert "Nucleus at top-p 0.9 over " in out


def test_nucleus_sizes_count_the_tokens_top_p_keeps(load_script):
    nucleus_sizes = load_script("experiments/benchmarks/trained_run_parity.py").nucleus_sizes
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.97, 0.01, 0.01, 0.01]]))
    np.testing.assert_array_equal(nucleus_sizes(logits, 0.9), [3, 1])
    np.testing.assert_array_equal(nucleus_sizes(logits, 1.0), [4, 4])
