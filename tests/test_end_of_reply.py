"""One end-of-reply policy for every path that generates (``jaxpt.data.eos_token_ids``), and
no silent tokenizer fallback (``jaxpt.data.tokenizer_for_model``)."""

import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt.config import load_config
from jaxpt.data import eos_token_ids, load_tokenizer, tokenizer_for_model
from jaxpt.data.tokenizer import end_of_turn_id
from jaxpt.loop import setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRPO_ARITH = os.path.join(ROOT, "configs", "grpo_arith.yaml")
LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


def _base_tokenizer():
    """The shipped ChatML tokenizer with a base model's eos (``<|endoftext|>``): its turns
    end with ``<|im_end|>``, which is no longer its eos."""
    tokenizer = load_tokenizer()
    tokenizer.eos_token = "<|endoftext|>"
    return tokenizer


def test_end_of_turn_comes_from_the_chat_template():
    chatml = _base_tokenizer()
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert chatml.eos_token_id != im_end
    assert end_of_turn_id(chatml) == im_end
    assert eos_token_ids(chatml) == sorted({chatml.eos_token_id, im_end})

    llama3 = _base_tokenizer()
    llama3.add_special_tokens({"additional_special_tokens": [
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    llama3.chat_template = LLAMA3_TEMPLATE
    eot = llama3.convert_tokens_to_ids("<|eot_id|>")
    assert eos_token_ids(llama3) == sorted({llama3.eos_token_id, eot})

    plain = _base_tokenizer()  # a template that ends replies with text: nothing to add
    plain.chat_template = "{% for m in messages %}{{ m['content'] + '\n\n' }}{% endfor %}"
    assert end_of_turn_id(plain) is None
    plain.chat_template = None
    assert eos_token_ids(plain) == [plain.eos_token_id]


END_OF_TURN = 3  # <|im_end|> in the shipped tokenizer


def _replies_end_of_turn_dir(path: str, *, generation_config: bool) -> str:
    """A tiny model that says ``<|im_end|>`` first, whatever the prompt, with a tokenizer
    whose eos is ``<|endoftext|>`` (as a base Llama 3's is ``<|end_of_text|>``). The end of
    turn is named only by ``generation_config.json`` (and the tokenizer has no chat
    template), or only by the chat template."""
    from tiny import TINY

    from jaxpt.models import init_model, save_pretrained

    model = init_model(TINY, seed=0)
    # Every embedding shares a large component that dominates the residual stream, and the
    # end-of-turn token's is twice the others': its (tied) logit leads by ~50.
    embed = model.model.embed_tokens.weight
    weights = np.asarray(embed[...]).copy()
    weights[:, 0] = 10.0
    weights[END_OF_TURN, 0] = 20.0
    embed[...] = jnp.asarray(weights)
    save_pretrained(model, path)
    tokenizer = _base_tokenizer()
    if generation_config:
        tokenizer.chat_template = None
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": [tokenizer.eos_token_id, END_OF_TURN]}, f)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("named_by", ["generation_config", "chat_template"])
def test_grpo_rollouts_and_eval_end_at_the_end_of_turn_token(
    named_by, tmp_path, prompts_file, mesh1
):
    model_dir = _replies_end_of_turn_dir(
        str(tmp_path / "model"), generation_config=named_by == "generation_config"
    )
    assert END_OF_TURN in eos_token_ids(tokenizer_for_model(model_dir), model_dir)
    overrides = {
        "output_dir": str(tmp_path / "run"), "model.path": model_dir, "data.train": prompts_file,
        "data.eval": prompts_file, "train.batch_size": 8, "grpo.num_generations": 4,
        "grpo.max_prompt_length": 16, "grpo.max_completion_length": 8,
        "grpo.eval_prompts": 4, "grpo.eval_reward": "last_number",
        "logging.progress": "false", "logging.tensorboard": "false",
    }
    config = load_config(GRPO_ARITH, [f"{k}={v}" for k, v in overrides.items()])
    with setup(config, mesh=mesh1) as run:
        rollout, metrics = run.source.sample(run.state, [0, 1])
        evaluated = run.evaluate(run.state)
    np.testing.assert_array_equal(rollout.tokens[:, 0], END_OF_TURN)
    np.testing.assert_array_equal(rollout.lengths, 1)  # the reply ends at its first token
    assert not rollout.truncated.any()
    assert metrics["completion_length/truncated_frac"] == 0.0
    assert evaluated["eval_completion_tokens"] == 1.0  # greedy eval stops there too


def test_a_model_dir_without_tokenizer_files_is_an_error_naming_it(tmp_path):
    from tiny import TINY

    from jaxpt.models import init_model, save_pretrained

    bare = str(tmp_path / "bare")
    save_pretrained(init_model(TINY, seed=0), bare)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{bare}: the model directory has no tokenizer")):
        tokenizer_for_model(bare)
    with pytest.raises(FileNotFoundError, match="the tokenizer directory has no tokenizer"):
        tokenizer_for_model("jaxpt-tiny", bare)
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing}: the model path does not exist")):
        tokenizer_for_model(missing)


@pytest.mark.parametrize("preset", ["jaxpt-tiny", "bench-tiny", "bench-small"])
def test_presets_use_the_shipped_tokenizer(preset):
    assert tokenizer_for_model(preset).get_vocab() == load_tokenizer().get_vocab()
