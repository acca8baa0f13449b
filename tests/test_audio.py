"""Text-to-audio spectrograms: STFT / Griffin-Lim / WAV (flagdit_jax.audio), the synthesised sounds
(data/sounds.py), the analytic reading of a spectrogram (eval/audio_eval.py) and the config."""

import pathlib

import numpy as np
import pytest
import scipy.io.wavfile

from flagdit_jax import audio
from flagdit_jax.data import buckets, pipeline, sounds
from flagdit_jax.eval import audio_eval

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "t2speech" / "sounds.py"
BIN_HZ = audio.SAMPLE_RATE / audio.N_FFT


def tone(freq, frames=32, amp=0.5, phase=0.3):
    t = np.arange(frames * audio.HOP) / audio.SAMPLE_RATE
    return amp * np.sin(2 * np.pi * freq * t + phase)


def dominant_hz(wave):
    n = 8 * len(wave)  # zero-padded: a 0.24 Hz grid
    spec = np.abs(np.fft.rfft(wave * np.hanning(len(wave)), n=n))
    return np.fft.rfftfreq(n, 1 / audio.SAMPLE_RATE)[spec.argmax()]


# --- audio.py ------------------------------------------------------------------------------------

def test_stft_round_trip_and_tone_magnitude():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(24 * audio.HOP)
    spec = audio.stft(x)
    assert spec.shape == (audio.N_FFT // 2 + 1, 24)
    np.testing.assert_allclose(audio.istft(spec), x, atol=1e-10)
    # A sinusoid of amplitude A on bin 16 reads A there (amplitude units) in every inner frame.
    mag = audio.spectrogram(tone(16 * BIN_HZ, amp=0.4))
    assert mag.shape == (audio.N_BINS, 32)
    assert (mag[:, 1:-1].argmax(0) == 16).all()
    np.testing.assert_allclose(mag[16, 1:-1], 0.4, rtol=1e-6)


def test_griffin_lim_recovers_the_pitch_and_converges():
    freq = 437.0  # between bins: the phase is not trivially recovered
    mag = audio.spectrogram(tone(freq))
    sc = {n: audio.spectral_convergence(mag, audio.griffin_lim(mag, n)) for n in (0, 4, 64)}
    assert sc[64] < sc[4] < sc[0]
    assert sc[64] < 0.1
    wave = audio.griffin_lim(mag, 64)
    # Magnitudes on 31.25 Hz bins pin the pitch to well within a bin (measured: 0.2-3.4 Hz off).
    assert abs(dominant_hz(wave) - freq) < BIN_HZ / 4
    assert abs(dominant_hz(audio.griffin_lim(mag, 64, momentum=0.0)) - freq) < BIN_HZ / 4


def test_normalise_round_trip_and_wav(tmp_path):
    mag = np.array([[0.0, 1e-4, 1e-2, 0.5, 1.0, 2.0]])
    x = audio.normalise(mag)
    np.testing.assert_allclose(x, [[-1, -1, -1 / 3, 1 + 40 * np.log10(0.5) / 60, 1, 1]], atol=1e-6)  # -60..0 dB
    back = audio.denormalise(x)
    np.testing.assert_allclose(back[0, 2:5], mag[0, 2:5], rtol=1e-5)
    assert back[0, 0] == 0.0  # the floor is silence
    w = tone(250.0, frames=8)
    path = audio.write_wav(tmp_path / "a.wav", w)
    rate, data = scipy.io.wavfile.read(path)
    assert rate == audio.SAMPLE_RATE and data.dtype == np.int16 and len(data) == len(w)
    np.testing.assert_allclose(data / 32767, w, atol=1e-4)


def test_audio_bad_input():
    with pytest.raises(ValueError, match="multiple of hop"):
        audio.stft(np.zeros(100))
    with pytest.raises(ValueError, match="non-negative"):
        audio.griffin_lim(-np.ones((4, 4)), 1)
    with pytest.raises(ValueError, match="n_bins"):
        audio.spectrogram(np.zeros(audio.HOP * 4), n_bins=0)
    with pytest.raises(ValueError, match="sample_rate"):
        audio.write_wav("/tmp/x.wav", np.zeros(8), 0)


# --- data/sounds.py ------------------------------------------------------------------------------

def test_sound_source_records():
    src = pipeline.get_source("sounds", "train", size=44, widths=(24, 32))
    shapes = src.frame_shapes()
    assert shapes.shape == (44, 3)
    for i in (0, 5, 11, 12, 43):
        e = src[i]
        assert e["frames"].shape == (1, *shapes[i][1:], 1) and e["frames"].dtype == np.float32
        assert -1 <= e["frames"].min() and e["frames"].max() <= 1 and e["frames"].max() > 0.3
        assert sounds.CLASSES[e["label"]] == src.layout(i)[0]
    assert {tuple(s) for s in shapes.tolist()} == {(1, 32, 24), (1, 32, 32)}
    np.testing.assert_array_equal(src[3]["frames"], src[3]["frames"])  # deterministic per record
    assert not np.array_equal(src[3]["frames"], src[25]["frames"])     # same class and width, another draw
    np.testing.assert_array_equal(src[3]["cap_feats"], src[25]["cap_feats"])
    assert not np.array_equal(src[3]["cap_feats"], src[4]["cap_feats"])
    other = sounds.SoundSource("eval", size=44)
    assert not np.array_equal(src[3]["frames"], other[3]["frames"])    # splits draw differently
    null = src.null_caption()
    assert null["cap_mask"].sum() == 1 and null["cap_feats"].shape == (6, 32)


def test_sound_source_bad_input():
    with pytest.raises(ValueError, match="split"):
        sounds.SoundSource("test")
    with pytest.raises(ValueError, match="widths"):
        sounds.SoundSource(widths=(4,))
    with pytest.raises(ValueError, match="cap_len"):
        sounds.SoundSource(cap_len=3)
    with pytest.raises(ValueError, match="unknown sound class"):
        sounds.synthesise(("tone", "shrill"), 32, np.random.default_rng(0))


def test_save_media_writes_the_sound(tmp_path):
    src = sounds.SoundSource("eval", size=22)
    frames = np.stack([src[i]["frames"] for i in (0, 2)])  # low tone, high tone at width 24
    paths = src.save_media(tmp_path / "s", frames)
    assert [p.name for p in paths] == ["s_0.wav", "s_1.wav", "s_spec.png"]
    for path, hz in zip(paths[:2], (sounds.PITCHES["low"], sounds.PITCHES["high"])):
        rate, data = scipy.io.wavfile.read(path)
        assert rate == audio.SAMPLE_RATE and len(data) == 24 * audio.HOP
        assert abs(dominant_hz(data.astype(np.float64)) - hz) < 15.0  # the record's own jitter is +-10 Hz
    from PIL import Image

    assert Image.open(paths[2]).size == (4 * (2 * 24 + 1), 4 * 32)


# --- eval/audio_eval.py --------------------------------------------------------------------------

def test_reading_real_sounds_is_the_floor():
    src = sounds.SoundSource("eval", size=88)
    for width in (24, 32, 48):
        specs = np.stack([src.render(i, width) for i in range(len(src))])
        r = audio_eval.score(specs, [src.layout(i)[0] for i in range(len(src))])
        assert r["match"] == 1.0, (width, r)


def test_reading_follows_edits():
    """Edits with a known answer: time reversal flips a chirp, deleting a beat lowers the count,
    shifting a tone's rows moves its pitch, silence and noise are unreadable / wrong."""
    src = sounds.SoundSource("eval", size=11)
    spec = {c: src.render(i) for i, c in enumerate(sounds.CLASSES)}
    assert audio_eval.read(spec[("chirp", "rising")][:, ::-1]) == ("chirp", "falling")
    three = spec[("beats", "three")].copy()
    loud = np.flatnonzero(three.max(0) > audio_eval.ACTIVE)
    last = loud[loud > loud[-1] - 3]
    three[:, last[0] - 1:] = -1.0  # silence the last beat
    assert audio_eval.read(three) == ("beats", "two")
    low = spec[("tone", "low")]
    assert audio_eval.read(np.roll(low, 16, axis=0)) == ("tone", "high")
    assert audio_eval.read(np.maximum(low, np.roll(low, 8, axis=0))) == ("chord", ("low", "mid"))
    assert audio_eval.read(np.full((32, 32), -1.0)) is None
    assert audio_eval.features(np.full((32, 32), -1.0))["onsets"] == 0
    r = audio_eval.score(np.full((2, 32, 24), -1.0), [("tone", "low"), ("beats", "two")])
    assert r["match"] == 0.0 and r["unreadable"] == 1.0
    with pytest.raises(ValueError, match="unknown sound classes"):
        audio_eval.score(np.zeros((1, 32, 24)), [("tone", "shrill")])


# --- the config ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arg", ["next", "flag"])
def test_config_buckets_fit_the_data(arg):
    from conftest import load_config
    from flagdit_jax import train

    config = load_config(CONFIG, arg)
    cfg = train.model_config(config)
    src = train.make_source(config)
    _, lengths = buckets.assign_buckets(buckets.record_shapes(src), cfg, config.data.buckets)
    assert lengths == tuple(config.data.buckets)
    assert cfg.in_channels == 1 and cfg.nextline == (arg == "flag")
    assert getattr(cfg, "rope_axes", 2) == 2


@pytest.mark.slow
def test_train_sample_eval_end_to_end(tmp_path):
    """A few training steps, then `flagdit sample` and `flagdit eval` write their files (no quality bar)."""
    from conftest import load_config
    from flagdit_jax import evaluate, sample, train

    config = load_config(CONFIG, **{"total_steps": 4, "global_batch": 8, "checkpoint.every_steps": 4,
                                    "checkpoint.async_save": False, "sample.num_steps": 2, "sample.per_class": 2,
                                    "eval.per_class": 1, "eval.long_widths": (40,), "eval.batch": 11,
                                    "data.options.size": 44})
    train.train(config, tmp_path)
    written = sample.sample_grid(config, tmp_path)
    assert sum(p.suffix == ".wav" for p in written) == 4 and sum(p.suffix == ".png" for p in written) == 4
    rep = evaluate.run(config, tmp_path)
    assert set(rep["generated"]) == {"24", "32", "40"} and rep["real_floor"]["40"]["match"] == 1.0
    assert (tmp_path / f"eval_{rep['step']}.json").exists() and (tmp_path / f"eval_{rep['step']}_40.png").exists()
