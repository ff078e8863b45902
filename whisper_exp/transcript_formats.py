"""Transcript files (txt, json, srt, vtt) and console text: the output side of ``transcribe``.

Kept apart from the model code so writing or formatting transcripts never imports torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from whisper_exp.decoding import Segment, TranscribeError, Word

OUTPUT_FORMATS = ("txt", "json", "srt", "vtt")


@dataclass
class Transcript:
    """One input file: its text and timed segments, or the error that stopped it."""

    file: str
    text: str = ""
    segments: list[Segment] = field(default_factory=list)
    duration: float = 0.0
    error: str | None = None
    # Word timings (``--word-timestamps``): subtitles then get one cue per word.
    words: list[Word] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    def cues(self) -> list[Segment]:
        """Words, else segments for subtitles; one cue for the whole file when there are no
        timestamps."""
        if self.words:
            return [Segment(word.start, word.end, word.word) for word in self.words]
        if self.segments:
            return self.segments
        return [Segment(0.0, self.duration, self.text)] if self.text else []

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["segments"] = [segment.to_dict() for segment in self.segments]
        if not self.words:
            del data["words"]
        return data


def _clock(seconds: float, decimal: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def format_txt(transcript: Transcript) -> str:
    return transcript.text + "\n"


def format_json(transcript: Transcript) -> str:
    return json.dumps(transcript.to_dict(), ensure_ascii=False, indent=2) + "\n"


def format_srt(transcript: Transcript) -> str:
    blocks = [f"{n}\n{_clock(cue.start, ',')} --> {_clock(cue.end, ',')}\n{cue.text}\n"
              for n, cue in enumerate(transcript.cues(), start=1)]
    return "\n".join(blocks)


def format_vtt(transcript: Transcript) -> str:
    blocks = [f"{_clock(cue.start, '.')} --> {_clock(cue.end, '.')}\n{cue.text}\n"
              for cue in transcript.cues()]
    return "WEBVTT\n\n" + "\n".join(blocks)


FORMATTERS: dict[str, Callable[[Transcript], str]] = {
    "txt": format_txt, "json": format_json, "srt": format_srt, "vtt": format_vtt,
}


def write_transcripts(transcripts: Sequence[Transcript], fmt: str,
                      output_dir: str | Path | None = None) -> list[Path]:
    """One ``<stem>.<fmt>`` per transcribed file: next to the audio, or under ``output_dir``
    mirroring the inputs' folders. Failed files get none."""
    if fmt not in FORMATTERS:
        raise TranscribeError(f"unknown format {fmt!r}; use one of {', '.join(OUTPUT_FORMATS)}")
    done = [t for t in transcripts if t.ok]
    root = None
    if output_dir is not None and done:
        root = Path(os.path.commonpath([str(Path(t.file).resolve().parent) for t in done]))
    written = []
    for transcript in done:
        source = Path(transcript.file).resolve()
        if root is None:
            target = source.with_suffix(f".{fmt}")
        else:
            target = Path(output_dir, source.parent.relative_to(root), f"{source.stem}.{fmt}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(FORMATTERS[fmt](transcript), encoding="utf-8")
        written.append(target)
    return written


def format_console(transcripts: Sequence[Transcript]) -> str:
    """Plain text for one file (pipe-friendly), ``file: text`` lines for several."""
    done = [t for t in transcripts if t.ok]
    if len(transcripts) == 1 and done:
        return done[0].text
    return "\n".join(f"{t.file}: {t.text}" for t in done)
