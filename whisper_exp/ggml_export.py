"""whisper.cpp (GGML) export: a merged Hugging Face Whisper folder written as the single model
file whisper.cpp loads, and whisper.cpp decoding through ``pywhispercpp`` to check it.

The file is whisper.cpp's legacy GGML layout (what its ``convert-h5-to-ggml.py`` writes and
``whisper_model_load`` reads): magic, eleven int32 hparams, the mel filterbank (n_mels x n_fft
float32), the BPE vocabulary as length-prefixed raw bytes in token-id order, then each tensor
as ``n_dims, name length, type, dims (fastest first), name, data`` under openai-whisper's names.
whisper.cpp fixes each tensor's type: 2-D weights in the file's weight type (f16, q8_0, q5_0),
convolution kernels f16 (f32 for an f32 file), biases, norms and positional embeddings f32.
q8_0 and q5_0 are ggml's reference block quantisers, written here in numpy (``pywhispercpp``
ships whisper.cpp but exposes no quantiser; tests check these bytes against ggml's own).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

GGML_MAGIC = 0x67676D6C  # "ggml"
# ggml's quantisation format version, stored as ftype + version * 1000 (whisper.cpp's quantizer).
GGML_QNT_VERSION = 2
GGML_QNT_VERSION_FACTOR = 1000
# precision -> (file ftype: ggml_ftype, weight tensor type: ggml_type)
GGML_PRECISIONS = {"f32": (0, 0), "f16": (1, 1), "q8_0": (7, 8), "q5_0": (8, 6)}
GGML_F32, GGML_F16 = 0, 1
QK = 32  # values per q8_0 / q5_0 block
GGML_MODEL_FILE = "ggml-model-{precision}.bin"
# Tensors that stay f32 whatever the file's weight type (whisper.cpp creates them f32).
_F32_TENSORS = {"encoder.conv1.bias", "encoder.conv2.bias", "encoder.positional_embedding",
                "decoder.positional_embedding"}
_CONV_WEIGHTS = {"encoder.conv1.weight", "encoder.conv2.weight"}
# Hugging Face module names -> openai-whisper's, inside encoder/decoder blocks.
_BLOCK_NAMES = {
    "self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key",
    "self_attn.v_proj": "attn.value", "self_attn.out_proj": "attn.out",
    "self_attn_layer_norm": "attn_ln",
    "encoder_attn.q_proj": "cross_attn.query", "encoder_attn.k_proj": "cross_attn.key",
    "encoder_attn.v_proj": "cross_attn.value", "encoder_attn.out_proj": "cross_attn.out",
    "encoder_attn_layer_norm": "cross_attn_ln",
    "fc1": "mlp.0", "fc2": "mlp.2", "final_layer_norm": "mlp_ln",
}
_TOP_NAMES = {
    "encoder.layer_norm": "encoder.ln_post", "decoder.layer_norm": "decoder.ln",
    "encoder.embed_positions.weight": "encoder.positional_embedding",
    "decoder.embed_positions.weight": "decoder.positional_embedding",
    "decoder.embed_tokens.weight": "decoder.token_embedding.weight",
}


class GGMLExportError(ValueError):
    """The model cannot be written in whisper.cpp's format (or the file is not one)."""


def ggml_tensor_name(hf_name: str) -> str | None:
    """openai-whisper's name for a ``WhisperForConditionalGeneration`` state-dict key; None for
    ``proj_out.weight``, which whisper.cpp ties to the token embedding."""
    if hf_name == "proj_out.weight":
        return None
    name = hf_name.removeprefix("model.")
    parts = name.split(".")
    if len(parts) > 3 and parts[1] == "layers":
        module = ".".join(parts[3:-1])
        if module not in _BLOCK_NAMES:
            raise GGMLExportError(f"no whisper.cpp name for {hf_name}")
        return ".".join([parts[0], "blocks", parts[2], _BLOCK_NAMES[module], parts[-1]])
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    stem, _, leaf = name.rpartition(".")
    return f"{_TOP_NAMES[stem]}.{leaf}" if stem in _TOP_NAMES else name


def _round_half_away(values: np.ndarray) -> np.ndarray:
    """C's roundf (ggml rounds halves away from zero; numpy rounds them to even)."""
    return np.sign(values) * np.floor(np.abs(values) + np.float32(0.5))


def quantize_q8_0(weights: np.ndarray) -> bytes:
    """ggml's q8_0: per 32 values an f16 scale amax/127 and 32 int8 (quantize_row_q8_0_ref)."""
    blocks = np.ascontiguousarray(weights, dtype=np.float32).reshape(-1, QK)
    scale = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    inverse = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale != 0)
    quants = _round_half_away(blocks * inverse).astype(np.int8)
    out = np.empty(len(blocks), dtype=[("d", "<f2"), ("qs", "i1", QK)])
    out["d"], out["qs"] = scale[:, 0].astype(np.float16), quants
    return out.tobytes()


def quantize_q5_0(weights: np.ndarray) -> bytes:
    """ggml's q5_0: per 32 values an f16 scale (the signed largest magnitude / -16), the fifth
    bits packed in a uint32 and the low nibbles two per byte (quantize_row_q5_0_ref)."""
    blocks = np.ascontiguousarray(weights, dtype=np.float32).reshape(-1, QK)
    signed_max = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)
    scale = signed_max / np.float32(-16)
    inverse = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale != 0)
    levels = np.minimum(31, (blocks * inverse + np.float32(16.5)).astype(np.int8)).astype(np.uint8)
    low, high = levels[:, :QK // 2], levels[:, QK // 2:]
    nibbles = (low & 0x0F) | ((high & 0x0F) << 4)
    bit_values = np.uint32(1) << np.arange(QK, dtype=np.uint32)
    fifth_bits = (((levels >> 4) & 1).astype(np.uint32) * bit_values).sum(axis=1, dtype=np.uint32)
    out = np.empty(len(blocks), dtype=[("d", "<f2"), ("qh", "<u4"), ("qs", "u1", QK // 2)])
    out["d"], out["qh"], out["qs"] = scale[:, 0].astype(np.float16), fifth_bits, nibbles
    return out.tobytes()


_QUANTIZERS = {8: quantize_q8_0, 6: quantize_q5_0}


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for raw bytes, inverted (byte-level BPE tokens -> bytes)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    stand_ins, extra = dict(zip(printable, printable, strict=True)), 0
    for byte in range(256):
        if byte not in stand_ins:
            stand_ins[byte] = 256 + extra
            extra += 1
    return {chr(char): byte for byte, char in stand_ins.items()}


def bpe_vocabulary(hf_dir: Path) -> list[bytes]:
    """The BPE tokens (no added special tokens: whisper.cpp numbers those itself) as raw bytes,
    in token-id order, from ``tokenizer.json``."""
    tokenizer_file = hf_dir / "tokenizer.json"
    if not tokenizer_file.exists():
        raise GGMLExportError(f"{hf_dir} has no tokenizer.json")
    vocab: dict[str, int] = json.loads(tokenizer_file.read_text(encoding="utf-8"))["model"]["vocab"]
    decoder = _gpt2_byte_decoder()
    ordered = sorted(vocab.items(), key=lambda item: item[1])
    if [index for _, index in ordered] != list(range(len(ordered))):
        raise GGMLExportError(f"{tokenizer_file}: BPE token ids are not 0..{len(ordered) - 1}")
    return [bytes(decoder[char] for char in token) for token, _ in ordered]


def _tensor_payload(name: str, values: np.ndarray, weight_type: int) -> tuple[np.ndarray, int,
                                                                               bytes]:
    """(array in the layout whisper.cpp expects, ggml type, data bytes) for one tensor."""
    if name in ("encoder.conv1.bias", "encoder.conv2.bias"):
        values = values.reshape(-1, 1)  # whisper.cpp's conv bias is [1, n_state]
    if weight_type == GGML_F32 or values.ndim < 2 or name in _F32_TENSORS:
        tensor_type = GGML_F32
    elif name in _CONV_WEIGHTS or weight_type == GGML_F16:
        tensor_type = GGML_F16
    else:
        tensor_type = weight_type
    if tensor_type == GGML_F32:
        return values, tensor_type, values.astype("<f4").tobytes()
    if tensor_type == GGML_F16:
        return values, tensor_type, values.astype("<f2").tobytes()
    if values.shape[-1] % QK:
        raise GGMLExportError(f"{name}: rows of {values.shape[-1]} values cannot be quantised "
                              f"in blocks of {QK}")
    return values, tensor_type, _QUANTIZERS[tensor_type](values)


def check_whisper_cpp_shape(d_model: int, encoder_ffn_dim: int, decoder_ffn_dim: int) -> None:
    """whisper.cpp builds every layer as openai-whisper does (feed-forward width 4 x d_model)
    and refuses any other file after reading it (its Python bindings then crash)."""
    if encoder_ffn_dim != 4 * d_model or decoder_ffn_dim != 4 * d_model:
        raise GGMLExportError(f"whisper.cpp needs feed-forward layers 4 x d_model wide "
                              f"({4 * d_model}); this model has {encoder_ffn_dim} (encoder) and "
                              f"{decoder_ffn_dim} (decoder)")


def convert_to_ggml(hf_dir: str | Path, output_file: str | Path, precision: str = "f16") -> Path:
    """Write the (already merged) Hugging Face Whisper model in ``hf_dir`` as a whisper.cpp
    model file with 2-D weights in ``precision`` (f16, q8_0, q5_0 or f32)."""
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    if precision not in GGML_PRECISIONS:
        raise GGMLExportError(f"precision {precision!r} is not available for ggml; use one of "
                              f"{', '.join(GGML_PRECISIONS)}")
    hf_dir, output_file = Path(hf_dir), Path(output_file)
    model = WhisperForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
    config = model.config
    state = {key: value.detach().cpu().numpy() for key, value in model.state_dict().items()}
    if "proj_out.weight" in state and not np.array_equal(
            state["proj_out.weight"], state["model.decoder.embed_tokens.weight"]):
        raise GGMLExportError("proj_out is not tied to the token embedding; whisper.cpp "
                              "computes logits with the token embedding")
    filters = WhisperFeatureExtractor.from_pretrained(hf_dir).mel_filters.T  # n_mels x n_fft
    if filters.shape[0] != config.num_mel_bins:
        raise GGMLExportError(f"feature extractor has {filters.shape[0]} mel bins, the model "
                              f"{config.num_mel_bins}")
    vocabulary = bpe_vocabulary(hf_dir)
    file_type, weight_type = GGML_PRECISIONS[precision]
    if weight_type not in (GGML_F32, GGML_F16):
        file_type += GGML_QNT_VERSION * GGML_QNT_VERSION_FACTOR
    check_whisper_cpp_shape(config.d_model, config.encoder_ffn_dim, config.decoder_ffn_dim)
    hparams = (config.vocab_size, config.max_source_positions, config.d_model,
               config.encoder_attention_heads, config.encoder_layers,
               config.max_target_positions, config.d_model, config.decoder_attention_heads,
               config.decoder_layers, config.num_mel_bins, file_type)

    output_file.parent.mkdir(parents=True, exist_ok=True)
    partial = output_file.with_name(output_file.name + ".partial")
    with partial.open("wb") as out:
        out.write(struct.pack("<12i", GGML_MAGIC, *hparams))
        out.write(struct.pack("<2i", *filters.shape))
        out.write(np.ascontiguousarray(filters, dtype="<f4").tobytes())
        out.write(struct.pack("<i", len(vocabulary)))
        for token in vocabulary:
            out.write(struct.pack("<i", len(token)) + token)
        for hf_name, values in state.items():
            name = ggml_tensor_name(hf_name)
            if name is None:
                continue
            values, tensor_type, data = _tensor_payload(name, values, weight_type)
            encoded = name.encode("utf-8")
            out.write(struct.pack(f"<3i{values.ndim}i", values.ndim, len(encoded), tensor_type,
                                  *reversed(values.shape)))
            out.write(encoded)
            out.write(data)
    partial.replace(output_file)
    return output_file


@dataclass
class GGMLTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (slowest first), as the Hugging Face tensor
    ggml_type: int
    offset: int  # where its data starts in the file


@dataclass
class GGMLModelFile:
    """A whisper.cpp model file's header, filterbank, vocabulary and tensor table."""

    hparams: dict[str, int]
    mel_filters: np.ndarray
    vocabulary: list[bytes]
    tensors: dict[str, GGMLTensor] = field(default_factory=dict)


HPARAM_NAMES = ("n_vocab", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer",
                "n_text_ctx", "n_text_state", "n_text_head", "n_text_layer", "n_mels", "ftype")
_TYPE_BYTES = {GGML_F32: (4, 1), GGML_F16: (2, 1), 8: (34, QK), 6: (22, QK)}  # (bytes, values)


def _read_ints(handle: BinaryIO, count: int) -> tuple[int, ...]:
    data = handle.read(4 * count)
    if len(data) != 4 * count:
        raise GGMLExportError("truncated GGML file")
    return struct.unpack(f"<{count}i", data)


def read_ggml_file(path: str | Path) -> GGMLModelFile:
    """Parse a whisper.cpp model file (to check an export without whisper.cpp)."""
    with Path(path).open("rb") as handle:
        (magic,) = _read_ints(handle, 1)
        if magic != GGML_MAGIC:
            raise GGMLExportError(f"{path} is not a GGML model (magic {magic:#x})")
        hparams = dict(zip(HPARAM_NAMES, _read_ints(handle, len(HPARAM_NAMES)), strict=True))
        n_mel, n_fft = _read_ints(handle, 2)
        filters = np.frombuffer(handle.read(4 * n_mel * n_fft), dtype="<f4").reshape(n_mel, n_fft)
        (n_tokens,) = _read_ints(handle, 1)
        vocabulary = [handle.read(_read_ints(handle, 1)[0]) for _ in range(n_tokens)]
        model = GGMLModelFile(hparams, filters, vocabulary)
        while header := handle.read(12):
            n_dims, name_length, ggml_type = struct.unpack("<3i", header)
            dims = _read_ints(handle, n_dims)
            name = handle.read(name_length).decode("utf-8")
            block_bytes, block_values = _TYPE_BYTES[ggml_type]
            size = int(np.prod(dims)) // block_values * block_bytes
            model.tensors[name] = GGMLTensor(name, tuple(reversed(dims)), ggml_type,
                                             handle.tell())
            handle.seek(size, 1)
    return model


def load_whisper_cpp(model_file: str | Path, n_threads: int = 0):
    """A ``pywhispercpp`` model for an exported file (never a download: the file must exist)."""
    import os

    from pywhispercpp.model import Model

    model_file = Path(model_file)
    if not model_file.is_file():
        raise GGMLExportError(f"{model_file} is not a GGML model file")
    header = read_ggml_file(model_file)
    mlp = header.tensors.get("encoder.blocks.0.mlp.0.weight")
    state = header.hparams["n_audio_state"]
    check_whisper_cpp_shape(state, mlp.shape[0] if mlp else 0, 4 * state)
    threads = n_threads or min(4, len(os.sched_getaffinity(0)))
    return Model(str(model_file), redirect_whispercpp_logs_to=None, n_threads=threads,
                 print_progress=False, print_realtime=False)


def transcribe_with_whisper_cpp(model_file, audios: Sequence[np.ndarray],
                                language: str | None = "en",
                                max_new_tokens: int | None = None) -> list[str]:
    """Greedy whisper.cpp transcripts of 16 kHz clips up to 30 s, decoded as the transformers
    backend does: temperature 0 without fallback, no timestamps, no previous text, non-speech
    tokens suppressed, no no-speech skipping, and the same token cap (``max_new_tokens``, else
    ``decoding.default_max_new_tokens`` of the clip); without the cap whisper.cpp drops a
    decode that loops to its own limit. ``model_file`` is a path or a ``load_whisper_cpp``
    model."""
    from whisper_exp.audio import SAMPLE_RATE
    from whisper_exp.decoding import default_max_new_tokens

    model = load_whisper_cpp(model_file) if isinstance(model_file, str | Path) else model_file
    texts = []
    for audio in audios:
        budget = max_new_tokens or default_max_new_tokens(len(audio) / SAMPLE_RATE)
        segments = model.transcribe(
            np.ascontiguousarray(audio, dtype=np.float32), language=language or "",
            no_timestamps=True, single_segment=True, no_context=True, temperature=0.0,
            temperature_inc=0.0, suppress_nst=True, no_speech_thold=1.0,
            max_tokens=budget - 1)  # whisper.cpp stops after token index max_tokens
        texts.append("".join(segment.text for segment in segments).strip())
    return texts
