"""One frozen text encoder object for pipelines and the caption cache.

`load_text_encoder(path)` reads a transformers checkpoint folder (config.json, model.safetensors
or a sharded index, tokenizer.json) and returns a `TextEncoder`, the `pipeline.TextEncoder`
protocol: `encoder(prompts) -> (feats float32 [B, S, D], mask bool [B, S])`.

The kind (config.json's model_type) fixes how prompts are encoded, after the official code
(REFERENCE.md §1):

| kind  | model | tokens | features |
|---|---|---|---|
| llama | LLaMA-2-7B, y_dim 4096 (Lumina-T2I) | BOS+EOS, cut to 128 (LT `lumina_t2i/train.py`), pad id 0 | `last_hidden_state` (final norm) |
| gemma | Gemma-2B, y_dim 2048 (Lumina-Next) | tokenizer's <bos>, truncated to 256 (LT `lumina_next_t2i/train.py: encode_prompt`) | `hidden_states[-2]` (output of the penultimate layer, no final norm) |
| bert  | e.g. all-MiniLM-L6-v2, 384 | [CLS] .. [SEP], truncated to sentence-transformers' max_seq_length (256 for MiniLM) | `last_hidden_state`; `sentence_embedding` = mean pool + L2 normalise |

All kinds right-pad to the batch's longest prompt rounded up to a multiple of 8 (Lumina-Next's rule;
the official LLaMA path pads to a fixed 128 in training and to the longest in its demo, which gives
the same features at real tokens since the decoder is causal). Padded positions come back as zeros
with mask False. The forward is jitted once per padded shape (jax.jit's cache). The null caption is
the encoder output of "" (`encode_null`), not zeros.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flagdit_jax.text import weights
from flagdit_jax.text.bert import Bert, BertConfig, mean_pool_normalize
from flagdit_jax.text.decoder import Decoder, DecoderConfig
from flagdit_jax.text.tokenizer import Tokenizer

TOKENIZER_NAME = "tokenizer.json"
# kind -> (max tokens, hidden_states index, truncation rule, force BOS+EOS); max None = from the folder.
KINDS = {
    "llama": dict(max_length=128, hidden_layer=-1, truncation="slice", bos_eos=True),
    "gemma": dict(max_length=256, hidden_layer=-2, truncation="tokenizer", bos_eos=False),
    "bert": dict(max_length=None, hidden_layer=-1, truncation="tokenizer", bos_eos=False),
}


def layer_depth(num_layers: int, hidden_layer: int) -> int:
    """transformers `hidden_states` index (N+1 entries: embeddings, then each layer) -> layers to run."""
    if isinstance(hidden_layer, bool) or not isinstance(hidden_layer, int) or \
            not -(num_layers + 1) <= hidden_layer <= num_layers:
        raise ValueError(f"hidden_layer={hidden_layer!r}: a {num_layers}-layer model has hidden_states indices "
                         f"{-(num_layers + 1)}..{num_layers}")
    return hidden_layer % (num_layers + 1)


class TextEncoder:
    """A loaded encoder: tokenizer + Flax module + params (see the module docstring for the kinds).

    Attributes: `kind`, `dim` (feature width D, the DiT's cap_feat_dim / y_dim), `max_length`,
    `hidden_layer`, `dtype`, `module`, `params`, `tokenizer`.
    """

    def __init__(self, kind: str, module, params, tokenizer: Tokenizer, *, dim: int, hidden_layer: int,
                 dtype: Any, folder: pathlib.Path | None = None):
        self.kind, self.module, self.params, self.tokenizer = kind, module, params, tokenizer
        self.dim, self.hidden_layer, self.dtype, self.folder = dim, hidden_layer, np.dtype(dtype), folder
        self.max_length = tokenizer.max_length
        self._forward = jax.jit(self._features)

    def _features(self, params, ids, mask):
        h = self.module.apply({"params": params}, ids, mask)
        return jnp.where(mask[..., None], h.astype(jnp.float32), 0.0)

    def tokenize(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """prompts -> ids int32 [B, S], mask bool [B, S] (S a multiple of 8)."""
        return self.tokenizer(prompts)

    def encode_ids(self, ids, mask) -> jax.Array:
        """ids [B, S] int, mask [B, S] bool -> features float32 [B, S, D], zero at padded positions."""
        # fp32 params: full-precision matmuls (as torch's default), not TF32 / bf16 passes on GPU/TPU.
        precision = "highest" if self.dtype == np.float32 else "default"
        with jax.default_matmul_precision(precision):
            return self._forward(self.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool))

    def __call__(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """prompts (list of str) -> (feats np.float32 [B, S, D], mask np.bool_ [B, S])."""
        ids, mask = self.tokenize(prompts)
        return np.asarray(self.encode_ids(ids, mask)), mask

    def encode_null(self) -> tuple[np.ndarray, np.ndarray]:
        """The null caption (classifier-free guidance): the output for "", [1, S, D] and [1, S]."""
        return self([""])

    def sentence_embedding(self, prompts: list[str]) -> np.ndarray:
        """BERT kinds with a sentence-transformers modules.json (Pooling mean, Normalize):
        prompts -> unit-norm embeddings np.float32 [B, D], as `SentenceTransformer.encode`."""
        if self.kind != "bert" or self.module.depth != self.module.cfg.num_layers:
            raise ValueError(f"sentence_embedding needs a bert encoder on its last layer (kind={self.kind!r}, "
                             f"hidden_layer={self.hidden_layer})")
        normalize = _sentence_transformers_normalize(self.folder)
        ids, mask = self.tokenize(prompts)
        feats = self.encode_ids(ids, mask)
        if normalize:
            return np.asarray(mean_pool_normalize(feats, jnp.asarray(mask)))
        m = mask[..., None].astype(np.float32)
        return np.asarray(feats).sum(1) / np.maximum(m.sum(1), 1e-9)


def _sentence_transformers_normalize(folder: pathlib.Path | None) -> bool:
    """Checks modules.json / 1_Pooling/config.json ask for mean pooling; True if a Normalize follows."""
    modules = None if folder is None else folder / "modules.json"
    if modules is None or not modules.is_file():
        raise ValueError(f"no sentence-transformers modules.json in {str(folder)!r}: its pooling is unknown")
    entries = json.loads(modules.read_text())
    pooling = [e for e in entries if e.get("type", "").endswith(".Pooling")]
    if len(pooling) != 1:
        raise ValueError(f"{str(modules)!r} has {len(pooling)} Pooling modules; expected one")
    pool_cfg = folder / pooling[0].get("path", "") / "config.json"
    if pool_cfg.is_file():
        modes = {k: v for k, v in json.loads(pool_cfg.read_text()).items() if k.startswith("pooling_mode_") and v}
        if list(modes) != ["pooling_mode_mean_tokens"]:
            raise ValueError(f"{str(pool_cfg)!r} asks for pooling {sorted(modes)}; only mean pooling is implemented")
    return any(e.get("type", "").endswith(".Normalize") for e in entries)


def _bert_max_length(folder: pathlib.Path, cfg: BertConfig) -> int:
    """sentence-transformers' max_seq_length (sentence_bert_config.json) if given, else the position table."""
    st = folder / "sentence_bert_config.json"
    if st.is_file():
        n = json.loads(st.read_text()).get("max_seq_length")
        if n:
            return int(n)
    return cfg.max_position_embeddings


def load_text_encoder(path: str | pathlib.Path, kind: str | None = None, *, dtype: Any = "float32",
                      max_length: int | None = None, hidden_layer: int | None = None,
                      pad_multiple: int = 8, tokenizer_path: str | pathlib.Path | None = None) -> TextEncoder:
    """Load a transformers checkpoint folder as a `TextEncoder`.

    kind: 'llama' | 'gemma' | 'bert'; default (None) config.json's model_type, which it must match
    when given. dtype: params and compute dtype ('float32', 'bfloat16', 'float16'; features are
    returned as float32). max_length / hidden_layer: override the kind's (table in the module
    docstring); hidden_layer indexes transformers' `hidden_states` (-1 = last_hidden_state).
    tokenizer_path: the folder holding tokenizer.json when it is not `path` (diffusers pipelines keep
    it in a sibling `tokenizer/`). Torch is not used.
    """
    folder = pathlib.Path(path)
    tok_folder = pathlib.Path(tokenizer_path) if tokenizer_path is not None else folder
    config = weights.read_config(folder)
    model_type = config.get("model_type")
    if kind is None:
        kind = model_type
    if kind not in KINDS:
        raise ValueError(f"text encoder kind {kind!r} (config.json model_type={model_type!r}) is not supported; "
                         f"expected one of {sorted(KINDS)}")
    if model_type is not None and model_type != kind:
        raise ValueError(f"kind={kind!r} but {str(folder / weights.CONFIG_NAME)!r} says model_type={model_type!r}")
    if not (tok_folder / TOKENIZER_NAME).is_file():
        raise ValueError(f"{str(tok_folder / TOKENIZER_NAME)!r} is missing: the text encoder needs the fast "
                         "tokenizer file (tokenizer.save_pretrained writes it)")
    weights.weight_files(folder)  # missing weights fail here, before any tracing
    recipe = KINDS[kind]
    dt = weights.as_dtype(dtype)
    hidden_layer = recipe["hidden_layer"] if hidden_layer is None else hidden_layer
    if kind == "bert":
        cfg = BertConfig.from_hf(config)
        depth = layer_depth(cfg.num_layers, hidden_layer)
        module, dim = Bert(cfg, depth, dtype=dt), cfg.hidden_size
        max_length = max_length or _bert_max_length(folder, cfg)
        if -(-max_length // pad_multiple) * pad_multiple > cfg.max_position_embeddings:
            raise ValueError(f"max_length={max_length} padded to a multiple of {pad_multiple} exceeds "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        pad_id, bos_eos = int(config.get("pad_token_id") or 0), None
    else:
        cfg = DecoderConfig.from_hf(config)
        depth = layer_depth(cfg.num_layers, hidden_layer)
        module = Decoder(cfg, depth, final_norm=depth == cfg.num_layers, dtype=dt)
        dim, max_length = cfg.hidden_size, max_length or recipe["max_length"]
        bos_eos = None
        if recipe["bos_eos"]:
            if config.get("bos_token_id") is None or config.get("eos_token_id") is None:
                raise ValueError(f"{kind} config.json needs bos_token_id and eos_token_id (captions get BOS and EOS)")
            eos = config["eos_token_id"]
            bos_eos = (int(config["bos_token_id"]), int(eos[0] if isinstance(eos, list) else eos))
        # LLaMA: the official code pads with 0 whatever the tokenizer's pad id; Gemma: its <pad> (0).
        pad_id = 0 if kind == "llama" else int(config.get("pad_token_id") or 0)
    tokenizer = Tokenizer(tok_folder / TOKENIZER_NAME, max_length=max_length, pad_id=pad_id, pad_multiple=pad_multiple,
                          truncation=recipe["truncation"], bos_eos=bos_eos)
    dummy = jnp.zeros((1, pad_multiple), jnp.int32)
    abstract = weights.abstract_params(module, dummy, jnp.ones((1, pad_multiple), bool))
    params = weights.load_params(folder, abstract, dtype=dt, prefixes=("", "model.", "bert."))
    return TextEncoder(kind, module, params, tokenizer, dim=dim, hidden_layer=hidden_layer, dtype=dt, folder=folder)
