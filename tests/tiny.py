"""The tiny model the trainer tests share: fast to compile, real architecture."""

from jaxpt.data import load_tokenizer
from jaxpt.models import init_model, save_pretrained

TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128,
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
    "max_position_embeddings": 256, "tie_word_embeddings": True,
}


def make_tiny_dir(path: str) -> str:
    """A tiny random causal-LM HF checkpoint with the shipped tokenizer."""
    save_pretrained(init_model(TINY, seed=0), path)
    load_tokenizer().save_pretrained(path)
    return path
