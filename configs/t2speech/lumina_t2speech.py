"""Lumina's released audio models as configs: Lumina-T2Audio ('audio') and Lumina-T2Music ('music'),
the Flag-DiT the official code builds for them, for paper-scale validation
(`experiments/paper_configs.py`). Every shape below is read from the official code (LT =
Alpha-VLLM/Lumina-T2X @1c606962): `lumina_audio/configs/lumina-text2audio.yaml`,
`lumina_music/configs/lumina-text2music.yaml`, `lumina_*/models/diffusion/flag_large_dit.py`
(FlagDiTv2), `lumina_*/models/diffusion/ddpm_audio.py` (CFM), `lumina_*/models/encoders/modules.py`,
`lumina_*/demo_*.py`. Tags: [UNVERIFIED] = not in the code; [2nd] = a secondary summary of the paper.

The paper's Lumina-T2Speech (LJSpeech, phoneme + pitch encoders, Flag-DiT S / B / L / XL) is NOT here:
its code is not released and the sizes known second-hand (REFERENCE.md §2: S 4/8/768, B 8/12/768,
L 12/24/1024, XL 20/28/1152) do not even give integer head widths for L and XL, so no config is built
from them.

The released model (both tasks, identical trunk):
- Flag-DiT 768 wide, 16 layers, 32 heads (head_dim 24), SwiGLU 2048 (multiple_of 256), RMSNorm eps
  1e-5, zero-init gated cross-attention with per-layer RMSNorm on the text (y_dim = context_dim 1024),
  pooled-caption adaLN (LayerNorm + Linear 1024 -> 768), adaLN width 768. FlagDiTv2 passes qk_norm=None:
  NO QK-norm. Output = input channels (no learn-sigma half). 1-D RoPE over the frame index (max_len
  1000). No [nextline], no [PAD], no caption mask (all ones).
- Input: mel spectrogram (80 bins) through the Make-An-Audio-2 1-D VAE: 20 latent channels, time / 2
  (`autoencoder1d.py`, down_layers [0]); each latent frame is one token (`proj_in` Linear 20 -> 768 with
  bias = our patch 1, one row of W frames, C = 20). Training length mel_length = 256 latent frames
  (yaml); the music test crop is 624 mel frames = 312 latent frames, the demos' default W = 312.
  16 kHz audio (run_*.sh); [UNVERIFIED] hop 256 -> 256 latent frames ~ 8.2 s.
- Text: 'audio' = CLAP's BERT-base text tower projected to 1024 (77 tokens, original caption)
  concatenated with T5-v1.1-large (1024, 77 tokens, structured caption) -> 154 x 1024
  (FrozenCLAPFLANEmbedder; its freeze() leaves the T5 trainable and the yaml says
  cond_stage_trainable: True, so the T5 may have been fine-tuned: here features are frozen).
  'music' = FLAN-T5-large, 77 x 1024 (FrozenFLANEmbedder).
- Objective (CFM): x_t = t x1 + (1 - (1 - 1e-4) t) x0, target x1 - (1 - 1e-4) x0, t = k / 1000 with k
  uniform in 0..999 -> our linear path, uniform t (sigma_min 1e-4 dropped). The official model embeds
  the integer k (t x 1000) in its sinusoid; ours embeds t in [0, 1]: same parameters, different input
  scale (a checkpoint converted from it would need t x 1000 fed in).
- Optimiser: AdamW (torch defaults: weight decay 0.01, betas 0.9 / 0.999), base_learning_rate 3e-6 with
  a linear warm-up of 10,000 steps (LambdaLinearScheduler f_start 1e-6 -> 1.0), then constant; the
  LDM trainer multiplies the base rate by GPUs x batch (scale_lr) [UNVERIFIED: the trainer and its
  batch are not released]: lr 3e-6 x 64 here. No EMA (use_ema: false). Global batch 64 [UNVERIFIED:
  the paper's T2Speech batch per [2nd]].
- Sampling: Euler over torch.linspace(0, 1, steps) (demo default 100), CFG 3.0 with the empty caption.

    python experiments/paper_configs.py --only lumina-t2audio,lumina-t2music --devices 8,64

Training it for real needs (shared code): mel + 1-D VAE encoding for `flagdit encode`, the CLAP / T5
text encoders, and a vocoder (BigVGAN) for listening. `data.frame_shape` = (1, 1, W) of the latent,
read by experiments/paper_configs.py.
"""

import ml_collections

from flagdit_jax.models import registry

TASKS = ("audio", "music")
MEL_LATENT_FRAMES = 256  # yaml mel_length
LATENT_CHANNELS = 20  # yaml in_channels / embed_dim
CONTEXT_DIM = 1024  # yaml context_dim
CAPTION_TOKENS = {"audio": 77 + 77, "music": 77}  # CLAP + T5-v1.1-large; FLAN-T5-large (max_length 77)
TEXT_ENCODER = {"audio": "clap+t5-v1_1-large", "music": "flan-t5-large"}


def get_config(arg="audio"):
    if arg not in TASKS:
        raise ValueError(f"configs/t2speech/lumina_t2speech.py:{arg}; expected one of {TASKS}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 500_000  # [UNVERIFIED]: not given
    c.global_batch = 64
    c.grad_accum_steps = 1
    c.task = "caption"
    c.caption_dropout = 0.1  # [UNVERIFIED]: the data pipeline that drops captions is not released

    c.text_encoder = ml_collections.ConfigDict(dict(path="", kind=TEXT_ENCODER[arg], max_length=CAPTION_TOKENS[arg],
                                                    dtype="float32"))
    c.vae = ml_collections.ConfigDict(dict(path=""))  # Make-An-Audio-2 1-D VAE (maa2.ckpt), scale_by_std

    c.model = ml_collections.ConfigDict(dict(
        preset="lumina-t2i-tiny", dim=768, n_layers=16, n_heads=32, multiple_of=256, patch_size=1,
        in_channels=LATENT_CHANNELS, cap_feat_dim=CONTEXT_DIM, learn_sigma=False, qk_norm=False, nextline=False,
        nextframe=False, dtype="float32", remat="none", attention="auto", scan_layers=False,
        sequence_parallel="ulysses"))

    # One latent row of W frames (H = 1, patch 1): W tokens, no [nextline].
    c.data = ml_collections.ConfigDict(dict(
        name="encoded", image_size=16, channels=LATENT_CHANNELS, worker_count=4, buckets=(MEL_LATENT_FRAMES,),
        frame_shape=(1, 1, MEL_LATENT_FRAMES), options=ml_collections.ConfigDict(dict(data_dir=""))))

    c.flow = ml_collections.ConfigDict(dict(path="linear", time_sampler="uniform", prediction="velocity"))
    c.optim = ml_collections.ConfigDict(dict(lr=3e-6 * 64, b1=0.9, b2=0.999, weight_decay=0.01, grad_clip=1e9,
                                             warmup_steps=10_000, schedule="constant"))
    c.ema_decay = 0.0  # use_ema: false
    c.mesh = ml_collections.ConfigDict(dict(shape=(1, -1, 1, 1), num_devices=-1))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=5_000, keep=3, async_save=True))
    c.log_every_steps = 100
    c.sample = ml_collections.ConfigDict(dict(method="euler", num_steps=100, cfg_scale=3.0, shift=1.0, per_class=4,
                                              use_ema=False))
    return c


def reference_params() -> int:
    """The official FlagDiTv2's parameter count for the yaml's arguments, from its constructor
    (flag_large_dit.py), independent of our model code."""
    d, layers, ctx, cin = 768, 16, CONTEXT_DIM, LATENT_CHANNELS
    ffn = 256 * -(-int(2 * 4 * d / 3) // 256)
    heads = 32
    block = (4 * d * d + 2 * ctx * d + heads  # wq wk wv wo, wk_y wv_y, gate
             + 3 * d * ffn + 2 * d + ctx  # SwiGLU, attention_norm / ffn_norm, attention_y_norm
             + d * 6 * d + 6 * d)  # adaLN_modulation
    t_emb = 256 * d + d + d * d + d
    head = d * 2 * d + 2 * d + d * cin + cin  # final adaLN, final linear
    return layers * block + t_emb + (cin * d + d) + head + (2 * ctx + ctx * d + d)  # + proj_in + cap_embedder
