import numpy as np
import pytest
import soundfile as sf
from conftest import write_tone

from whisper_exp.audio import AudioError, AudioRef, find_audio_files, load_audio, probe


@pytest.mark.parametrize("suffix, fmt, subtype", [
    ("wav", "WAV", "PCM_16"), ("flac", "FLAC", "PCM_16"), ("ogg", "OGG", "VORBIS"),
    ("mp3", "MP3", "MPEG_LAYER_III"),
])
def test_formats_resample_to_16k_mono(tmp_path, suffix, fmt, subtype):
    path = write_tone(tmp_path / f"a.{suffix}", seconds=1.0, rate=44_100, channels=2,
                      fmt=fmt, subtype=subtype)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    # mp3 encoders pad a few frames; length must still be ~1 s at 16 kHz
    assert abs(len(audio) - 16_000) < 1_200
    assert 0.05 < np.abs(audio).max() <= 1.0


def test_bytes_and_paths_decode_identically(tmp_path):
    path = write_tone(tmp_path / "a.flac", rate=8_000)
    np.testing.assert_array_equal(load_audio(path), load_audio(path.read_bytes()))


def test_probe_reads_duration_without_decoding(tmp_path):
    info = probe(write_tone(tmp_path / "a.wav", seconds=2.5, rate=22_050))
    assert info.duration_s == pytest.approx(2.5, abs=1e-3) and info.sample_rate == 22_050


def test_garbage_and_empty_audio_are_errors(tmp_path):
    garbage = tmp_path / "x.wav"
    garbage.write_bytes(b"not audio at all")
    with pytest.raises(AudioError, match="cannot"):
        load_audio(garbage)
    empty = tmp_path / "e.wav"
    sf.write(str(empty), np.zeros(0, dtype=np.float32), 16_000)
    with pytest.raises(AudioError, match="no samples"):
        load_audio(empty)


def test_find_audio_files(tmp_path):
    write_tone(tmp_path / "a.wav")
    (tmp_path / "sub").mkdir()
    write_tone(tmp_path / "sub" / "b.flac")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in find_audio_files(tmp_path)] == ["a.wav"]
    assert [p.name for p in find_audio_files(tmp_path, recursive=True)] == ["a.wav", "b.flac"]


class _BytesRef:
    """A minimal AudioRef: anything with a name and read_bytes() is decoded like a file."""

    def __init__(self, data: bytes):
        self.name, self.data, self.reads = "ref", data, 0

    def read_bytes(self) -> bytes:
        self.reads += 1
        return self.data


def test_audio_refs_are_read_on_demand(tmp_path):
    path = write_tone(tmp_path / "a.flac", seconds=1.5, rate=8_000)
    ref = _BytesRef(path.read_bytes())
    assert isinstance(ref, AudioRef) and ref.reads == 0
    np.testing.assert_array_equal(load_audio(ref), load_audio(path))
    assert probe(ref) == probe(path) and ref.reads == 2
    with pytest.raises(AudioError, match="cannot"):
        load_audio(_BytesRef(b"not audio"))
