"""ctypes binding of libespeak-ng, as shipped (library and data) by the espeakng-loader wheel.

espeak-ng keeps all of its state in globals and is not re-entrant, so the library is
initialised once per process and every call into it holds `LIBRARY_LOCK`. Synthesis uses
the synchronous output mode: `espeak_Synth` calls our callback with each block of int16
samples from inside the call, on the calling thread, and stops when the callback returns 1.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lowvox.errors import EngineUnavailable, LowvoxError, UnknownVoice

logger = logging.getLogger(__name__)

# One lock for the whole process: espeak-ng's state is global to the loaded library.
LIBRARY_LOCK = threading.Lock()

# speak_lib.h constants.
AUDIO_OUTPUT_SYNCHRONOUS = 2
INITIALIZE_DONT_EXIT = 0x8000  # return an error instead of calling exit()
CHARS_UTF8 = 1
ENDPAUSE = 0x1000  # a sentence pause at the end of the text
POS_CHARACTER = 1
EE_OK = 0
PARAM_RATE = 1
PARAM_PITCH = 3
RATE_MINIMUM = 80  # words per minute; espeak-ng speaks no slower
RATE_NORMAL = 175

# Milliseconds of audio per callback: small blocks let a stream start early.
BUFFER_MS = 100

# Receives one block of float32 samples in [-1, 1]; returns False to stop synthesis.
AudioSink = Callable[[np.ndarray], bool]


class _Voice(ctypes.Structure):
    # espeak_VOICE. `languages` is a run of (priority byte, NUL-terminated code) pairs
    # ending with a zero byte, so it is read by hand rather than as a c_char_p.
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


# int callback(short *wav, int numsamples, espeak_EVENT *events)
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


@dataclass(frozen=True)
class EspeakVoice:
    """A voice file of espeak-ng's data: `identifier` (e.g. "gmw/en-US") selects it."""

    name: str
    identifier: str
    languages: tuple[tuple[int, str], ...]  # (priority, code); lower priority = better fit
    gender: int  # 0 unknown, 1 male, 2 female


class EspeakLibrary:
    """The loaded, initialised libespeak-ng. Use `get_library()`, not the constructor."""

    def __init__(self, library_path: str, data_path: str) -> None:
        try:
            self._lib = ctypes.CDLL(library_path)
        except OSError as e:
            raise EngineUnavailable(f"cannot load libespeak-ng from {library_path}: {e}") from e
        self._declare()
        self._sink: AudioSink | None = None
        self._sink_error: BaseException | None = None
        # ctypes must keep the callback object alive as long as the library may call it.
        self._callback = _SYNTH_CALLBACK(self._on_audio)
        with LIBRARY_LOCK:
            rate = self._lib.espeak_Initialize(
                AUDIO_OUTPUT_SYNCHRONOUS, BUFFER_MS, data_path.encode(), INITIALIZE_DONT_EXIT
            )
            if rate <= 0:
                raise EngineUnavailable(
                    f"espeak-ng failed to initialise (code {rate}) with data at {data_path}"
                )
            self._lib.espeak_SetSynthCallback(self._callback)
            version = self._lib.espeak_Info(None)
        self.sample_rate: int = rate
        self.version = version.decode() if version else "unknown"
        logger.debug("espeak-ng %s initialised at %d Hz", self.version, rate)

    def _declare(self) -> None:
        lib = self._lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_ListVoices.argtypes = [ctypes.POINTER(_Voice)]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,  # text
            ctypes.c_size_t,  # size in bytes, including the NUL
            ctypes.c_uint,  # position
            ctypes.c_int,  # position type
            ctypes.c_uint,  # end position (0: none)
            ctypes.c_uint,  # flags
            ctypes.c_void_p,  # unique identifier out (unused)
            ctypes.c_void_p,  # user data (unused)
        ]
        lib.espeak_Synth.restype = ctypes.c_int

    # -- voices ---------------------------------------------------------------------------

    def list_voices(self) -> list[EspeakVoice]:
        """The speaking voices (one per language/accent), in espeak-ng's order."""
        with LIBRARY_LOCK:
            return self._list(None)

    def list_variants(self) -> list[EspeakVoice]:
        """The voice variants ("m3", "f2", "klatt", ...) that can follow a voice after '+'."""
        spec = _Voice()
        code = ctypes.c_char_p(b"variant")
        spec.languages = ctypes.cast(code, ctypes.c_void_p)
        with LIBRARY_LOCK:
            return self._list(spec)

    def _list(self, spec: _Voice | None) -> list[EspeakVoice]:
        array = self._lib.espeak_ListVoices(ctypes.byref(spec) if spec is not None else None)
        voices = []
        i = 0
        while array and array[i]:
            v = array[i].contents
            voices.append(
                EspeakVoice(
                    name=(v.name or b"").decode("utf-8", "replace").strip(),
                    identifier=(v.identifier or b"").decode("utf-8", "replace"),
                    languages=_parse_languages(v.languages),
                    gender=int(v.gender),
                )
            )
            i += 1
        return voices

    # -- synthesis ------------------------------------------------------------------------

    def synthesize(self, text: str, voice: str, rate: int, pitch: int, sink: AudioSink) -> None:
        """Speak `text` with `voice` (an identifier, optionally "+variant"), blocking.

        Each block of audio goes to `sink` as it is produced, from this thread and with
        the library lock held: the sink must be quick and must not call espeak-ng.
        Returns when the text is done or the sink returned False.
        """
        # espeak reads up to the first NUL; lone surrogates cannot be UTF-8.
        data = text.replace("\x00", " ").encode("utf-8", "replace")
        with LIBRARY_LOCK:
            if self._lib.espeak_SetVoiceByName(voice.encode("utf-8")) != EE_OK:
                raise UnknownVoice(voice)
            # After the voice: selecting a voice resets these.
            self._lib.espeak_SetParameter(PARAM_RATE, int(rate), 0)
            self._lib.espeak_SetParameter(PARAM_PITCH, int(pitch), 0)
            self._sink, self._sink_error = sink, None
            try:
                result = self._lib.espeak_Synth(
                    data, len(data) + 1, 0, POS_CHARACTER, 0, CHARS_UTF8 | ENDPAUSE, None, None
                )
            finally:
                self._sink = None
            error, self._sink_error = self._sink_error, None
        if error is not None:
            raise error
        if result != EE_OK:
            raise LowvoxError(f"espeak-ng synthesis failed (code {result})")

    def _on_audio(self, wav: ctypes._Pointer, num_samples: int, events: int) -> int:
        # Called by espeak_Synth on the synthesising thread; 1 aborts the synthesis.
        # An exception must not escape into C, so it is kept and re-raised by synthesize.
        sink = self._sink
        if sink is None:
            return 1
        if not wav or num_samples <= 0:
            return 0  # NULL at the end of the text, or an events-only call
        try:
            block = np.ctypeslib.as_array(wav, shape=(num_samples,))
            samples = block.astype(np.float32) / 32768.0  # a copy: espeak reuses the buffer
            return 0 if sink(samples) else 1
        except BaseException as e:  # noqa: BLE001 - handed back to the caller
            self._sink_error = e
            return 1


def _parse_languages(address: int | None) -> tuple[tuple[int, str], ...]:
    if not address:
        return ()
    languages = []
    while True:
        priority = ctypes.string_at(address, 1)[0]
        if priority == 0:
            break
        code = ctypes.string_at(address + 1)
        languages.append((priority, code.decode("utf-8", "replace")))
        address += len(code) + 2  # priority byte, code, NUL
    return tuple(languages)


_library: EspeakLibrary | None = None
_library_init = threading.Lock()


def get_library() -> EspeakLibrary:
    """The process-wide espeak-ng, loaded from the espeakng-loader wheel on first use."""
    global _library
    with _library_init:
        if _library is None:
            try:
                import espeakng_loader
            except ImportError as e:
                raise EngineUnavailable(
                    "the espeak engine needs the espeakng-loader package (pip install espeakng-loader)"
                ) from e
            try:
                data_path = espeakng_loader.get_data_path()
            except RuntimeError as e:
                raise EngineUnavailable(f"espeak-ng data is missing: {e}") from e
            _library = EspeakLibrary(espeakng_loader.get_library_path(), data_path)
        return _library
