"""A cryptographically secure random source for noise and Poisson sampling (secure mode).

torch's generators (mt19937 on CPU, Philox on GPU) are fast and reproducible but not
cryptographic: whoever learns their state, or enough of their output, can predict the
noise and subtract it. :class:`SecureRandom` draws instead from a stream that is
unpredictable without a key that never leaves the process:

* ``"aes-ctr"`` (default when the ``cryptography`` package is installed, ``pip install
  dptorch[secure]``): AES-256 in counter mode, as implemented by OpenSSL, keyed with 32
  bytes and a 16-byte counter block from ``os.urandom``, re-keyed every 64 GiB of output
  and after a ``fork``. Several GB/s on one core with AES-NI (8 GB/s measured).
* ``"os"``: ``os.urandom`` for every byte (the kernel's CSPRNG). No dependency, about
  10x slower.

The stream is turned into numbers without losing randomness to floating point:

* uniforms: 53 random bits -> an exact float64 in ``[0, 1)``;
* Bernoulli(p): a 64-bit integer compared, exactly, with ``ceil(p * 2^64)``;
* Gaussians: Box-Muller (1958) in float64 on exact 52-bit uniforms, with the radius
  uniform drawn to full depth in the tail (see :func:`normal_from_words_`), so no region
  of the support is cut off. Where it was built, a compiled kernel
  (``_secure_gaussian.c``) computes the same transform of the words in one vectorised pass,
  to a few float64 ulps of the torch version (tested against it); the rare words that need
  a deeper radius uniform (probability ``2^-52`` a pair) take the torch version.

There is no seed and no ``get_state``: a secure run cannot be replayed, by design.
Copying or pickling a :class:`SecureRandom` gives a freshly keyed, independent one, so a
stream is never duplicated (a copied stream would repeat the same noise).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import torch
from torch import Tensor

from dptorch._extensions import load_optional_extension
from dptorch.errors import DPValueError, MissingDependencyError

__all__ = [
    "SecureRandom",
    "bernoulli_from_words",
    "normal_from_words",
    "normal_from_words_",
    "uniform_from_words",
]

Backend = Literal["auto", "aes-ctr", "os"]


_REKEY_BYTES = 1 << 36  # 64 GiB per key: far below AES-CTR's birthday bound
_MASK53 = (1 << 53) - 1
_MASK52 = (1 << 52) - 1
_ONE_BITS = 0x3FF0_0000_0000_0000  # the bits of float64 1.0: sign 0, exponent 0, mantissa 0
_CHUNK = 1 << 22  # normals per transform pass: bounds the keystream scratch to 32 MB


class SecureRandom:
    """A CSPRNG byte stream and the exact transforms dptorch needs from it.

    Args:
        backend: ``"aes-ctr"``, ``"os"``, or ``"auto"`` (AES-CTR when ``cryptography`` is
            installed, else ``os.urandom``).

    Raises:
        MissingDependencyError: ``backend="aes-ctr"`` without the ``cryptography`` package.
        DPValueError: an unknown ``backend``.

    Privacy: every byte comes from a CSPRNG keyed by the operating system's entropy; the
    key is held only in this object and never saved, so the noise it yields cannot be
    reproduced or predicted from anything a checkpoint or a log contains.
    """

    # Draws are made on the CPU; GPU noise is drawn here and copied (see dptorch.noise).
    device = torch.device("cpu")

    def __init__(self, backend: Backend = "auto") -> None:
        if backend not in ("auto", "aes-ctr", "os"):
            raise DPValueError(
                f"backend={backend!r} is not a secure random backend; use 'auto', 'aes-ctr' "
                "(needs `pip install cryptography`) or 'os' (os.urandom)."
            )
        if backend == "auto":
            backend = "aes-ctr" if _has_cryptography() else "os"
        if backend == "aes-ctr" and not _has_cryptography():
            raise MissingDependencyError(
                "SecureRandom(backend='aes-ctr') needs the cryptography package: "
                "pip install 'dptorch[secure]' (or use backend='os', which is slower)."
            )
        self.backend: Literal["aes-ctr", "os"] = backend
        self._encryptor: Any = None
        self._lock = threading.Lock()  # one stream, one user at a time
        self._zeros = b""  # the plaintext (zeros) whose encryption is the keystream
        # Standard normals drawn ahead on a background thread, by size: the next step's
        # noise is drawn while the model computes (see normal()).
        self._ahead: dict[int, Future[Tensor]] = {}
        self._scratch = bytearray()  # keystream buffer reused by _normal_now
        self._scratch_lock = threading.Lock()
        self._children: list[SecureRandom] = []  # streams of the threads of large draws
        self._rekey()

    # -- the byte stream -------------------------------------------------------------------
    def _rekey(self) -> None:
        self._pid = os.getpid()
        self._used = 0
        self._ahead = {}  # draws made ahead belong to the parent's stream
        if self.backend == "aes-ctr":
            from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

            cipher = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16)))
            self._encryptor = cipher.encryptor()

    def random_bytes(self, count: int) -> bytearray:
        """``count`` bytes from the stream (a fresh, writable buffer)."""
        out = bytearray(count + 15)
        self._fill(out, count)
        del out[count:]
        return out

    def _fill(self, out: bytearray, count: int) -> None:
        """Overwrite ``out[:count]`` with the next ``count`` bytes of the stream.

        ``out`` must have 15 spare bytes (the cipher may write up to a block more).
        """
        with self._lock:
            if os.getpid() != self._pid:
                self._rekey()  # a forked child must not replay its parent's stream
            if self.backend == "os":
                out[:count] = os.urandom(count)
                return
            if self._used + count > _REKEY_BYTES:
                self._rekey()
            self._used += count
            if len(self._zeros) < count:
                self._zeros = bytes(count)
            self._encryptor.update_into(memoryview(self._zeros)[:count], out)

    def words(self, count: int) -> Tensor:
        """``[count]`` int64 tensor of independent uniform 64-bit words (two's complement)."""
        if count == 0:
            return torch.empty(0, dtype=torch.int64)
        out = bytearray(8 * count + 15)
        self._fill(out, 8 * count)
        return torch.frombuffer(out, dtype=torch.int64, count=count)

    # -- numbers ---------------------------------------------------------------------------
    def uniform(self, count: int) -> Tensor:
        """``[count]`` float64 uniforms on the grid ``{k 2^-53 : 0 <= k < 2^53}``."""
        return uniform_from_words(self.words(count))

    def bernoulli(self, count: int, p: float) -> Tensor:
        """``[count]`` bool tensor, each True with probability ``ceil(p 2^64) / 2^64``.

        Privacy: this is ``p`` exactly when ``p`` is a multiple of ``2^-64`` and exceeds it
        by less than ``2^-64`` otherwise; used for Poisson sampling at rate ``p``.
        """
        return bernoulli_from_words(self.words(count), p)

    def normal(
        self, count: int, scale: float = 1.0, *, ahead: bool = False, out: Tensor | None = None
    ) -> Tensor:
        """``[count]`` float64 ``N(0, scale^2)`` draws (Box-Muller, tail drawn to full depth).

        Args:
            count: how many draws.
            scale: their standard deviation (folded into the radius: no extra pass).
            out: a contiguous ``[count]`` float64 CPU tensor to draw into (not with ``ahead``).
            ahead: draw the next call's standard normals of the same ``count`` at once, on a
                background thread and its own stream, split over the cores. For GPU training,
                where the CPU idles while the device computes: noise does not depend on the
                data, so the next step's can be drawn during this one. It costs 8 bytes per
                draw until used. Leave it off when the model computes on the CPU: there the
                draw competes with the step for the same cores (measured: no faster, more
                memory; see docs/hardening.md).

        Raises:
            DPValueError: ``scale`` NaN, infinite or negative.
        """
        if not (math.isfinite(scale) and scale >= 0):
            raise DPValueError(
                f"SecureRandom.normal: scale={scale!r} must be a finite standard deviation >= 0 "
                "(a NaN or infinite scale gives NaN or inf noise; pass the noise's std)."
            )
        if not ahead:
            if out is None:
                out = torch.empty(count, dtype=torch.float64)
            return self._normal_into(out, scale)
        if out is not None:
            raise DPValueError("SecureRandom.normal: out= cannot be used with ahead=True.")
        waiting = self._ahead.pop(count, None)
        fresh = waiting is not None and os.getpid() == self._pid
        out = waiting.result() if fresh and waiting is not None else self._normal_split(count)
        if len(self._ahead) < 4:  # a few sizes (one per device and dtype group) at most
            self._ahead[count] = _background().submit(self._normal_split, count)
        return out.mul_(scale) if scale != 1.0 else out

    def _normal_split(self, count: int) -> Tensor:
        """Standard normals, a large draw split over threads (each its own keyed stream)."""
        out = torch.empty(count, dtype=torch.float64)
        workers = _cpu_threads() if count >= _PARALLEL_MIN else 1
        if workers < 2:
            return self._normal_into(out)
        # torch and OpenSSL release the GIL: the cost per step divides by the cores.
        if len(self._children) < workers:
            self._children = [SecureRandom(self.backend) for _ in range(workers)]
        parts = out.chunk(workers)
        jobs = [  # each part on one thread: the parts are the parallelism
            _workers().submit(c._normal_into, p, 1.0, 1)
            for c, p in zip(self._children, parts, strict=False)
        ]
        for job in jobs:
            job.result()
        return out

    def _normal_into(self, out: Tensor, scale: float = 1.0, threads: int | None = None) -> Tensor:
        count = out.numel()
        with self._scratch_lock:
            for start, size, bits in self._word_chunks(count):
                words = bits.numel()
                target = out[start : start + size]
                if _compiled_transform(bits, target, scale, threads):
                    continue
                # The scratch words are consumed in place (no temporaries of the draw's size).
                if words == size:
                    normal_from_words_(bits, self.words, out=target, scale=scale)
                else:  # an odd count: one draw of the last pair is dropped
                    target.copy_(normal_from_words_(bits, self.words, scale=scale)[:size])
        return out

    def _word_chunks(self, count: int) -> Iterator[tuple[int, int, Tensor]]:
        """``(start, size, words)`` per chunk of a draw of ``count`` values: ``2 ceil(size /
        2)`` fresh int64 words in the reused scratch, valid until the next chunk is made.
        Hold ``_scratch_lock`` while iterating."""
        for start in range(0, count, _CHUNK):
            size = min(_CHUNK, count - start)
            words = 2 * ((size + 1) // 2)
            if len(self._scratch) < 8 * words + 15:
                self._scratch = bytearray(8 * words + 15)
            self._fill(self._scratch, 8 * words)
            yield start, size, torch.frombuffer(self._scratch, dtype=torch.int64, count=words)

    def snapped_release_(self, sums: Tensor, std: float, scale: float, grid: float) -> Tensor:
        """Overwrite the float32 CPU ``sums`` with ``grid * round(z + scale * sums)``, ``z``
        fresh ``N(0, std^2)`` float64 draws (``std`` and ``scale`` in units of ``grid``).

        Secure mode's release in one pass of the compiled kernel (``release`` in
        ``_secure_gaussian.c``): the values of drawing ``z`` with :meth:`normal`, adding the
        scaled sums in float64 and :func:`dptorch.noise.snap_to_grid`, without the float64
        buffer. Needs :func:`compiled_transform_available`. A chunk whose words need a
        deeper radius uniform (probability ``2^-52`` a pair) is computed in torch instead.
        """
        if _TRANSFORM is None:
            raise DPValueError("snapped_release_: the compiled secure transform is not built.")
        if sums.dtype != torch.float32 or sums.device.type != "cpu" or not sums.is_contiguous():
            raise DPValueError("snapped_release_: sums must be a contiguous float32 CPU tensor.")
        flat = sums.view(-1)
        count = flat.numel()
        threads = torch.get_num_threads()
        with self._scratch_lock:
            for start, size, bits in self._word_chunks(count):
                target = flat[start : start + size]
                deep = _TRANSFORM.release(
                    bits.data_ptr(), target.data_ptr(), size, std, scale, grid, threads
                )
                if deep:  # nothing was written: the torch transform draws the depth
                    noise = normal_from_words_(bits, self.words, scale=std)[:size]
                    released = noise.add_(target.double(), alpha=scale).round_().mul_(grid)
                    target.copy_(released)
        return sums

    def seed(self) -> int:
        """A 63-bit seed for a torch generator that only needs to be unpredictable.

        Used for what secure mode does not need to be cryptographic (DataLoader worker
        seeds), never for noise or sampling.
        """
        return int(self.words(1).item()) & ((1 << 63) - 1)

    # -- never duplicate a stream ----------------------------------------------------------
    def __deepcopy__(self, memo: dict[int, Any]) -> SecureRandom:
        return SecureRandom(self.backend)

    def __copy__(self) -> SecureRandom:
        return SecureRandom(self.backend)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return SecureRandom, (self.backend,)

    def __repr__(self) -> str:
        return f"SecureRandom(backend={self.backend!r})"


# -- transforms: pure functions of the words, so they can be tested with fixed inputs -----
def uniform_from_words(words: Tensor) -> Tensor:
    """float64 uniforms ``k 2^-53`` from the top 53 bits of each int64 word (exact)."""
    return ((words >> 11) & _MASK53).to(torch.float64) * 2.0**-53


def bernoulli_from_words(words: Tensor, p: float) -> Tensor:
    """True where the word, read as an unsigned 64-bit integer, is below ``ceil(p 2^64)``.

    The comparison is done on integers, so the inclusion probability is exactly
    ``ceil(p 2^64) / 2^64``: no rounding of a float uniform can bias it.
    """
    p = float(p)
    if not 0.0 <= p <= 1.0 or math.isnan(p):
        raise DPValueError(f"p={p!r} must be a probability in [0, 1].")
    if p == 1.0:
        return torch.ones(words.shape, dtype=torch.bool)
    numerator, denominator = p.as_integer_ratio()
    threshold = -((-numerator << 64) // denominator)  # ceil(p 2^64), exact, < 2^64
    # Flipping the sign bit maps unsigned order onto signed order: u - 2^63.
    shifted = words ^ torch.tensor(-(1 << 63), dtype=torch.int64)
    return shifted < threshold - (1 << 63)


def normal_from_words(words: Tensor, more_words: Any = None, out: Tensor | None = None) -> Tensor:
    """:func:`normal_from_words_` on a copy: ``words`` is left as it was."""
    return normal_from_words_(words.clone(), more_words, out=out)


def normal_from_words_(
    words: Tensor, more_words: Any = None, out: Tensor | None = None, scale: float = 1.0
) -> Tensor:
    """``[len(words)]`` float64 ``N(0, scale^2)`` draws by Box-Muller; overwrites ``words``.

    The first half of the words gives the radius uniform ``u1``, the second the angle
    uniform ``u2``, each from the low 52 bits of a word ``m``: ``u2 = m 2^-52`` and
    ``u1 = (m + 1/2) 2^-52``, built by writing ``m`` under the exponent of 1.0 (an exact
    float in ``[1, 2)``) in the words' own memory, so the draw needs no temporaries. When
    ``m = 0`` for the radius (probability ``2^-52``) its uniform lies in ``[0, 2^-52)`` and
    is drawn again, scaled, from ``more_words(count)``, as deep as needed. So the radius
    ``sqrt(-2 ln u1)`` is not cut off at ``sqrt(2 ln 2^53) ~ 8.57``, as a single 52-bit
    uniform would cut it: the Gaussian's tail is present down to float64's smallest numbers
    (about 38 standard deviations).

    Args:
        words: an even number of int64 words (contiguous); used as scratch space.
        more_words: ``count -> [count] int64`` words for the rare deeper draws; ``None``
            keeps the depth-one value (test use only).
        out: a float64 tensor of ``len(words)`` elements to write the draws into.
        scale: the standard deviation of the draws.
    """
    if words.numel() % 2:
        raise DPValueError(f"normal_from_words needs an even number of words, got {len(words)}.")
    half = words.numel() // 2
    # [1, 2) floats from the low 52 bits of each word, in place: exact, two passes.
    ones = words.bitwise_and_(_MASK52).bitwise_or_(_ONE_BITS).view(torch.float64)
    u1, angle = ones[:half], ones[half:]  # [half] each
    deep = (u1 == 1.0).nonzero().flatten() if half and float(u1.min()) == 1.0 else None
    u1.sub_(1.0 - 2.0**-53)  # (m + 1/2) 2^-52: exact (Sterbenz), never 0
    if deep is not None:
        level = 2.0**-52
        while deep.numel() and more_words is not None and level > 2.0**-1000:
            bits = more_words(deep.numel()) & _MASK52
            u1[deep] = (bits.to(torch.float64) + 0.5) * (2.0**-52 * level)
            deep = deep[bits == 0]
            level *= 2.0**-52
    # sqrt(-2 ln u1) |scale| = sqrt(ln u1 (-2 scale^2)): the scale costs no extra pass. All
    # in place and in torch, whose log and sqrt split over the intra-op threads (numpy's run
    # on one: 0.32 and 0.34 ms against torch's 0.18 and 0.10 for 335k draws, 2 threads).
    folded = math.isfinite(2.0 * scale * scale)  # not above ~1e154, where scale^2 overflows
    radius = u1.log_().mul_(-2.0 * scale * scale if folded else -2.0).sqrt_()
    if not folded:
        radius.mul_(abs(scale))
    # cos and sin of 2 pi (1 + u2) = those of 2 pi u2: the shift by one period costs nothing
    # (one pass instead of two; the argument stays below 4 pi, reduced to full precision).
    angle.mul_(2.0 * math.pi)
    out = torch.empty(2 * half, dtype=torch.float64) if out is None else out
    torch.cos(angle, out=out[:half]).mul_(radius)
    torch.sin(angle, out=out[half:]).mul_(radius)
    return out


_TRANSFORM = load_optional_extension("_secure_gaussian", "compiled secure transform", "torch")


def compiled_transform_available() -> bool:
    """Whether the float64 Box-Muller of :func:`normal_from_words_` runs compiled
    (``_secure_gaussian.c``: one vectorised pass instead of eleven torch passes)."""
    return _TRANSFORM is not None


def _compiled_transform(
    words: Tensor, out: Tensor, scale: float, threads: int | None = None
) -> bool:
    """``out`` = :func:`normal_from_words_` of ``words`` (read only) by the compiled kernel.

    Returns False, writing nothing useful, where the kernel is missing or a radius word needs
    a deeper uniform (probability ``2^-52`` a pair): the caller then runs the torch transform
    on the same words, which draws that depth. ``threads``: OpenMP threads (torch's count by
    default).
    """
    if _TRANSFORM is None:
        return False
    if threads is None:
        threads = torch.get_num_threads()
    deep = _TRANSFORM.transform(
        words.data_ptr(), out.data_ptr(), out.numel(), float(scale), threads
    )
    return deep == 0


_PARALLEL_MIN = 1 << 18  # below this a draw takes a few ms on one core: not worth threads
_pool: ThreadPoolExecutor | None = None
_worker_pool: ThreadPoolExecutor | None = None


def _background() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dptorch-secure")
    return _pool


def _cpu_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        cores = os.cpu_count() or 1
    return min(cores, 8)


def _workers() -> ThreadPoolExecutor:
    global _worker_pool
    if _worker_pool is None:
        _worker_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dptorch-secure-w")
    return _worker_pool


def _has_cryptography() -> bool:
    try:
        import cryptography.hazmat.primitives.ciphers  # noqa: F401
    except ImportError:
        return False
    return True
