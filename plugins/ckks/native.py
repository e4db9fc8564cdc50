"""Hoisted rotations: several rotations of one ciphertext for little more than the price of one.

SEAL's ``rotate_vector`` key-switches each rotation from scratch. Its costly part, splitting
the ciphertext's second part into one digit per prime and transforming every digit into
every prime, does not depend on the step: a Galois automorphism acts on the transformed
digits as a permutation. So :class:`Native` splits a ciphertext once
(:meth:`Native.split`) and then derives each rotation from the split
(:meth:`Native.rotate`), reading SEAL's key and ciphertext buffers in place and writing
each result into a new SEAL ciphertext. At LeNet-5's second convolution (N=16384, 5
primes) a rotation from the split costs about half of SEAL's. :meth:`Native.dot` sums
plaintext products with one modular reduction per coefficient where SEAL's
``multiply_plain`` and ``add_inplace`` make two per product.

The arithmetic is in ``_native.c`` (built by ``setup.py``; optional). SEAL's Python
bindings give no buffer addresses, so :func:`buffer` reads them from the objects' memory
(pybind11 keeps the C++ object's address after the Python object header; SEAL 4's
``Ciphertext`` layout) and checks every field it can against SEAL's own accessors before
it trusts the address. :func:`available` runs a self-test against SEAL's rotation once per
process; anything unexpected (no extension, another SEAL layout, a mismatch) makes it
``False`` with the reason in :func:`why_unavailable`, and the plugin rotates with SEAL.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .backend import galois_element, sealapi

__all__ = ["Native", "Split", "Sums", "available", "buffer", "key_buffers", "plain_buffer",
           "why_unavailable"]

_OBJ = 16            # pybind11: the C++ object's address after PyObject_HEAD
# seal::Ciphertext: parms_id, is_ntt_form, size, degree, limbs, scale, correction, data
_SIZE, _DEGREE, _LIMBS, _SCALE, _DYN_SIZE, _DATA = 40, 48, 56, 64, 104, 112
# seal::Plaintext: parms_id, coeff_count, scale, data
_PT_COUNT, _PT_SCALE, _PT_DYN_SIZE, _PT_DATA = 32, 40, 72, 80
# seal::GaloisKeys: pool, parms_id, keys_ (a vector of vectors of PublicKey, each one
# Ciphertext of _CT_BYTES)
_KEYS_VEC, _CT_BYTES = 48, 144
_TAB_HEAD = 8
#: Smallest ring degree at which a rotation from scratch on two threads (``rotate_one``)
#: beats SEAL's: LeNet-5 at N=16384 1.19 s against 1.70 s; TenSEAL's CNN at N=8192 0.13 s
#: against 0.11 s (bench_ckks, one run).
FAST_SINGLE_DEGREE = 16384
_status: dict[str, Any] = {}


def _u64(addr: int) -> int:
    return ctypes.c_uint64.from_address(addr).value


def buffer(ct: Any) -> np.ndarray:
    """SEAL's own buffer of ``ct`` as a writable ``(parts, limbs, N)`` uint64 view.

    The view is valid while ``ct`` lives and is not resized. ``RuntimeError`` if the
    object does not look like the SEAL 4 ``Ciphertext`` this module was written against.
    """
    obj = _u64(id(ct) + _OBJ)
    parts, n, limbs = ct.size(), ct.poly_modulus_degree(), ct.coeff_modulus_size()
    if obj == 0 or (_u64(obj + _SIZE), _u64(obj + _DEGREE), _u64(obj + _LIMBS)) \
            != (parts, n, limbs) or _u64(obj + _DYN_SIZE) != parts * n * limbs \
            or ctypes.c_double.from_address(obj + _SCALE).value != ct.scale:
        raise RuntimeError("ckks native: the SEAL Ciphertext layout is not the expected one")
    addr = _u64(obj + _DATA)
    if addr == 0 or parts == 0:
        raise RuntimeError("ckks native: the ciphertext has no data")
    view = np.ctypeslib.as_array((ctypes.c_uint64 * (parts * n * limbs)).from_address(addr))
    if int(view[0]) != ct.data(0) or (parts > 1 and int(view[n * limbs]) != ct.data(1)):
        raise RuntimeError("ckks native: the SEAL Ciphertext buffer does not match its data")
    return view.reshape(parts, limbs, n)


def key_buffers(galois: Any, elt: int, n: int, limbs: int) -> list[np.ndarray]:
    """SEAL's own buffers of the Galois key of ``elt`` (one ``(2, limbs, n)`` view per
    decomposition prime; valid while ``galois`` lives), checked against SEAL's copy of the
    key (``GaloisKeys.key`` copies, so it is called once, here)."""
    copies = galois.key(elt)
    obj = _u64(id(galois) + _OBJ)
    begin, end = _u64(obj + _KEYS_VEC), _u64(obj + _KEYS_VEC + 8)
    index = galois.get_index(elt)
    if obj == 0 or begin == 0 or (end - begin) % 24 or not 0 <= index < (end - begin) // 24:
        raise RuntimeError("ckks native: the SEAL GaloisKeys layout is not the expected one")
    first, last = _u64(begin + 24 * index), _u64(begin + 24 * index + 8)
    if last - first != _CT_BYTES * len(copies):
        raise RuntimeError("ckks native: the SEAL GaloisKeys layout is not the expected one")
    size = 2 * n * limbs
    views = []
    for j, pk in enumerate(copies):
        ct = first + _CT_BYTES * j
        if (_u64(ct + _SIZE), _u64(ct + _DEGREE), _u64(ct + _LIMBS), _u64(ct + _DYN_SIZE)) \
                != (2, n, limbs, size) or _u64(ct + _DATA) == 0:
            raise RuntimeError("ckks native: the SEAL GaloisKeys layout is not the expected one")
        view = np.ctypeslib.as_array((ctypes.c_uint64 * size).from_address(_u64(ct + _DATA)))
        ref = buffer(pk.data())
        if not (view[:: n // 8] == ref.reshape(-1)[:: n // 8]).all():
            raise RuntimeError("ckks native: the SEAL GaloisKeys buffer does not match its data")
        view.setflags(write=False)
        views.append(view.reshape(2, limbs, n))
    return views


def plain_buffer(pt: Any, limbs: int, n: int) -> np.ndarray:
    """SEAL's own buffer of the NTT-form plaintext ``pt`` (``limbs`` primes of degree
    ``n``) as a read-only ``(limbs, n)`` uint64 view (valid while ``pt`` lives);
    ``RuntimeError`` as :func:`buffer`, ``ValueError`` for a plaintext of another level."""
    obj = _u64(id(pt) + _OBJ)
    count = pt.coeff_count()
    if count != limbs * n:
        raise ValueError(f"ckks native: a plaintext of {count} coefficients where "
                         f"{limbs} primes of degree {n} were expected")
    if obj == 0 or not pt.is_ntt_form() \
            or _u64(obj + _PT_COUNT) != count or _u64(obj + _PT_DYN_SIZE) != count \
            or ctypes.c_double.from_address(obj + _PT_SCALE).value != pt.scale:
        raise RuntimeError("ckks native: the SEAL Plaintext layout is not the expected one")
    addr = _u64(obj + _PT_DATA)
    if addr == 0:
        raise RuntimeError("ckks native: the plaintext has no data")
    view = np.ctypeslib.as_array((ctypes.c_uint64 * count).from_address(addr))
    if int(view[0]) != pt.data(0) or int(view[count - 1]) != pt.data(count - 1):
        raise RuntimeError("ckks native: the SEAL Plaintext buffer does not match its data")
    view.setflags(write=False)
    return view.reshape(limbs, n)


def _brev(bits: int) -> np.ndarray:
    idx = np.arange(1 << bits, dtype=np.int64)
    out = np.zeros_like(idx)
    for b in range(bits):
        out |= ((idx >> b) & 1) << (bits - 1 - b)
    return out


@functools.lru_cache(maxsize=64)
def _table(q: int, n: int) -> np.ndarray:
    """One prime's constants and transform tables, laid out as ``_native.c`` reads them."""
    # the minimal primitive 2n-th root of unity (SEAL's choice)
    x = 2
    while True:
        g = pow(x, (q - 1) // (2 * n), q)
        if pow(g, n, q) == q - 1:
            break
        x += 1
    g2, cur, psi = g * g % q, g, g
    for _ in range(n):
        psi = min(psi, cur)
        cur = cur * g2 % q
    inv = pow(psi, -1, q)
    powers, ipowers = [1] * n, [1] * n
    for i in range(1, n):
        powers[i] = powers[i - 1] * psi % q
        ipowers[i] = ipowers[i - 1] * inv % q
    order = _brev(n.bit_length() - 1).tolist()
    roots = [powers[k] for k in order]
    iroots = [ipowers[k] for k in order]
    ratio = (1 << 128) // q
    ninv = pow(n, -1, q)
    head = [q, ratio & (2 ** 64 - 1), ratio >> 64, ninv, (ninv << 64) // q, 0, 0, 0]
    tab = np.array(head + roots + [(w << 64) // q for w in roots] + iroots
                   + [(w << 64) // q for w in iroots], dtype=np.uint64)
    tab.setflags(write=False)
    return tab


@functools.lru_cache(maxsize=256)
def _perm(elt: int, n: int) -> np.ndarray:
    """The Galois automorphism ``elt`` on a limb in NTT order: ``out[i] = in[perm[i]]``."""
    bits = n.bit_length() - 1
    rev_wide = _brev(bits + 1)
    i = np.arange(n, 2 * n, dtype=np.int64)
    raw = ((elt * rev_wide[i]) >> 1) & (n - 1)
    perm = _brev(bits)[raw].astype(np.uint32)
    perm.setflags(write=False)
    return perm


class Split:
    """A ciphertext's hoisted digits, ready for :meth:`Native.rotate` (several steps)."""

    __slots__ = ("ct", "limbs", "digits", "c0")

    def __init__(self, ct: Any, limbs: int, digits: np.ndarray, c0: np.ndarray) -> None:
        self.ct, self.limbs, self.digits, self.c0 = ct, limbs, digits, c0


class Sums:
    """Several sums of products over one pool of ciphertexts (:meth:`Native.sums`):
    output ``labels[o]`` is the sum of ``pt * cts[key]`` over its ``(key, pt)`` terms."""

    __slots__ = ("labels", "keys", "counts", "index", "pts", "addrs", "limbs", "scale")

    def __init__(self, labels: Sequence[Any], terms: Sequence[Sequence[tuple[Any, Any]]],
                 limbs: int, n: int) -> None:
        if len(labels) != len(terms) or any(not t for t in terms):
            raise ValueError("ckks native: every sum needs a label and at least one term")
        self.labels = list(labels)
        self.keys: list[Any] = []
        slot: dict[Any, int] = {}
        for t in terms:
            for key, _ in t:
                if key not in slot:
                    slot[key] = len(self.keys)
                    self.keys.append(key)
        self.counts = np.array([len(t) for t in terms], dtype=np.int64)
        self.index = np.array([slot[key] for t in terms for key, _ in t], dtype=np.int64)
        self.pts = [pt for t in terms for _, pt in t]  # keeps SEAL's buffers alive
        self.limbs = limbs
        self.scale = self.pts[0].scale
        if any(p.scale != self.scale for p in self.pts):
            raise ValueError("ckks native: the plaintexts of one sum differ in scale")
        self.addrs = np.array([plain_buffer(p, limbs, n).ctypes.data for p in self.pts],
                              dtype=np.uint64)


class Native:
    """Sums of plaintext products (:meth:`run`, :meth:`dot`) and hoisted rotations (:meth:`split`,
    :meth:`rotate`, with the Galois keys of ``steps``, a subset of ``galois``'s) on SEAL's
    own buffers. Reads SEAL's keys in place (no copies) and holds one table per prime."""

    def __init__(self, seal: Any, galois: Any = None, steps: Iterable[int] = (),
                 threads: int = 1) -> None:
        from . import _native  # noqa: PLC0415 - optional extension

        self._native = _native
        # the C functions release the GIL: several rotations of one split, the digits of
        # one split and the giant steps of one sum run side by side
        self.threads = max(1, int(threads))
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ckks-native") \
            if self.threads > 1 else None
        self.seal = seal
        self.n = seal.params.poly_modulus_degree
        key_primes = [m.value() for m in seal.context.key_context_data().parms().coeff_modulus()]
        if max(key_primes) >= 1 << 60:
            raise RuntimeError("ckks native: primes of 60 bits or more (the products' "
                               "128-bit sums assume fewer)")
        self.special = key_primes[-1]
        self.data_primes = key_primes[:-1]
        self.tables = [_table(q, self.n) for q in key_primes]
        self._keys: dict[int, tuple[list[np.ndarray], np.ndarray]] = {}
        half = self.n // 2
        for step in sorted({s % half for s in steps} - {0}):
            elt = galois_element(step, self.n)
            if galois is None or not galois.has_key(elt):
                raise KeyError(f"ckks native: no Galois key for step {step}")
            views = key_buffers(galois, elt, self.n, len(key_primes))
            addrs = np.array([v.ctypes.data for v in views], dtype=np.uint64)
            self._keys[step] = (views, addrs)
        self._galois = galois  # keeps the keys' buffers alive
        self.steps = frozenset(self._keys)
        """The steps :meth:`rotate` can take."""
        self.fast_single = self.threads > 1 and self.n >= FAST_SINGLE_DEGREE
        """Whether :meth:`rotate_one` beats SEAL's ``rotate_vector`` here."""
        self._consts: dict[int, np.ndarray] = {}
        self._tab_addrs: dict[int, np.ndarray] = {}

    def _tabs(self, limbs: int) -> np.ndarray:
        """Table addresses: the first ``limbs`` data primes, then the special prime."""
        if limbs not in self._tab_addrs:  # _consts first: another thread may be reading
            if not 1 <= limbs <= len(self.data_primes):
                raise ValueError(f"ckks native: {limbs} primes, the chain has "
                                 f"{len(self.data_primes)}")
            p = self.special
            qs = self.data_primes[:limbs]
            inv = [pow(p, -1, q) for q in qs]
            self._consts[limbs] = np.array(
                [v for iv, q in zip(inv, qs) for v in (iv, (iv << 64) // q)]
                + [(p >> 1) % q for q in qs], dtype=np.uint64)
            tabs = self.tables[:limbs] + [self.tables[-1]]
            self._tab_addrs[limbs] = np.array([t.ctypes.data for t in tabs], dtype=np.uint64)
        return self._tab_addrs[limbs]

    def _like(self, ct: Any) -> tuple[Any, np.ndarray]:
        """A new ciphertext with ``ct``'s parameters and scale, and its buffer."""
        out = sealapi().Ciphertext()
        self.seal.evaluator.mod_switch_to(ct, ct.parms_id(), out)
        return out, buffer(out)

    def products(self, pts: Sequence[Any], limbs: int) -> Sums:
        """One sum over ``pts``, for :meth:`dot` (its terms keyed by position)."""
        return Sums([0], [list(enumerate(pts))], limbs, self.n)

    def dot(self, cts: Sequence[Any], prods: Sums, acc: Any = None) -> Any:
        """``acc + sum_t prods.pts[t] * cts[t]`` (``prods`` from :meth:`products`), added
        into ``acc`` when given, else a new ciphertext: :meth:`run` of one sum."""
        if len(cts) != len(prods.pts) or not cts:
            raise ValueError(f"ckks native: {len(cts)} ciphertexts for "
                             f"{len(prods.pts)} plaintexts")
        out = self.run(prods, dict(enumerate(cts)))[0]
        if acc is None:
            return out
        if acc.coeff_modulus_size() != prods.limbs or abs(acc.scale / out.scale - 1) > 1e-9:
            raise ValueError("ckks native: the accumulator differs in level or scale")
        self.seal.evaluator.add_inplace(acc, out)
        return acc

    def sums(self, labels: Sequence[Any], terms: Sequence[Sequence[tuple[Any, Any]]],
             limbs: int) -> Sums:
        return Sums(labels, terms, limbs, self.n)

    def run(self, sums: Sums, cts: Mapping[Any, Any]) -> dict[Any, Any]:
        """``{label: sum}`` of ``sums`` over ``cts`` (``{key: ciphertext}``), in one pass
        over the coefficients (:meth:`dot` per sum reads every ciphertext once per sum)."""
        pool = [cts[k] for k in sums.keys]
        bufs = [buffer(c) for c in pool]
        shape = (2, sums.limbs, self.n)
        if any(b.shape != shape for b in bufs) or any(c.scale != pool[0].scale for c in pool):
            raise ValueError("ckks native: the ciphertexts of one sum differ in level or scale")
        outs = [self._like(pool[0]) for _ in sums.labels]
        addrs = np.array([b.ctypes.data for b in bufs], dtype=np.uint64)
        out_addrs = np.array([b.ctypes.data for _, b in outs], dtype=np.uint64)
        tabs = self._tabs(sums.limbs).ctypes.data
        starts = np.concatenate([[0], np.cumsum(sums.counts)])

        def part(lo: int, hi: int) -> None:  # outputs [lo, hi)
            t = int(starts[lo])
            self._native.dots(hi - lo, sums.counts[lo:].ctypes.data, sums.index[t:].ctypes.data,
                              sums.addrs[t:].ctypes.data, addrs.ctypes.data, sums.limbs, self.n,
                              tabs, out_addrs[lo:].ctypes.data)

        self._parallel(part, len(outs), starts)
        scale = pool[0].scale * sums.scale
        for ct, _ in outs:
            ct.scale = scale
        return {label: ct for label, (ct, _) in zip(sums.labels, outs)}

    def split(self, ct: Any) -> Split:
        """Hoist ``ct`` (two parts, NTT form): ``limbs`` inverse and ``limbs**2`` forward
        transforms, once for every rotation of it."""
        if ct.size() != 2 or not ct.is_ntt_form():
            raise ValueError("ckks native: only two-part NTT-form ciphertexts can be hoisted")
        buf = buffer(ct)
        limbs = buf.shape[1]
        if buf.shape[2] != self.n:
            raise ValueError(f"ckks native: a ciphertext of degree {buf.shape[2]}, not {self.n}")
        tabs = self._tabs(limbs)
        digits = np.empty((limbs, limbs + 1, self.n), dtype=np.uint64)
        c1 = np.ascontiguousarray(buf[1])
        self._parallel(lambda lo, hi: self._native.split(
            c1.ctypes.data, limbs, self.n, tabs.ctypes.data, digits.ctypes.data, lo, hi), limbs)
        return Split(ct, limbs, digits, buf[0].copy())  # a snapshot, as the digits are

    def _parallel(self, fn: Any, count: int, weights: np.ndarray | None = None) -> None:
        """``fn(lo, hi)`` over ``[0, count)`` cut into ``threads`` runs of about equal
        weight (``weights``: cumulative, ``count + 1`` entries; default: one each)."""
        if self._pool is None or count < 2:
            fn(0, count)
            return
        cum = np.arange(count + 1) if weights is None else weights
        parts = min(self.threads, count)
        cuts = [0] + [int(np.searchsorted(cum, cum[-1] * k / parts)) for k in range(1, parts)]
        cuts = sorted(set(min(max(c, 1), count - 1) for c in cuts[1:]) | {0, count})
        for f in [self._pool.submit(fn, lo, hi) for lo, hi in zip(cuts, cuts[1:])]:
            f.result()

    def rotations(self, split: Split, steps: Sequence[int]) -> list[Any]:
        """``split``'s ciphertext rotated by each of ``steps`` (whole rotations side by side
        on the threads)."""
        if self._pool is None or len(steps) < 2:
            return [self.rotate(split, s) for s in steps]
        return list(self._pool.map(lambda s: self.rotate(split, s, parallel=False), steps))

    def rotate(self, split: Split, step: int, parallel: bool = True) -> Any:
        """``split``'s ciphertext rotated left by ``step`` slots (a new SEAL ciphertext);
        ``parallel``: its phases side by side on the threads."""
        step %= self.n // 2
        if step not in self._keys:
            raise KeyError(f"ckks native: no Galois key for step {step}")
        views, addrs = self._keys[step]
        limbs = split.limbs
        key_limbs = views[0].shape[1]
        if limbs >= key_limbs or limbs > len(views):
            raise ValueError(f"ckks native: a ciphertext of {limbs} primes for keys of "
                             f"{key_limbs}")
        out, obuf = self._like(split.ct)
        perm = _perm(galois_element(step, self.n), self.n)
        tabs = self._tabs(limbs).ctypes.data
        acc = np.empty((2, limbs + 1, self.n), dtype=np.uint64)
        nat = self._native
        run = self._parallel if parallel else (lambda fn, count: fn(0, count))
        run(lambda lo, hi: nat.rotate_mac(
            split.digits.ctypes.data, perm.ctypes.data, limbs, self.n, tabs, addrs.ctypes.data,
            key_limbs, key_limbs - 1, acc.ctypes.data, lo, hi), limbs + 1)
        run(lambda lo, hi: [nat.rotate_down(
            acc.ctypes.data, split.c0.ctypes.data, perm.ctypes.data, limbs, self.n, tabs,
            self._consts[limbs].ctypes.data, obuf.ctypes.data, p) for p in range(lo, hi)], 2)
        return out

    def rotate_one(self, ct: Any, step: int) -> Any:
        """``ct`` rotated by ``step``: a split and one rotation from it (with two or more
        threads, faster than SEAL's own rotation)."""
        return self.rotate(self.split(ct), step)


def available() -> bool:
    """Whether hoisted rotations work here (cached; see :func:`why_unavailable`)."""
    if "ok" not in _status:
        _status["ok"], _status["why"] = _self_test()
    return bool(_status["ok"])


def why_unavailable() -> str:
    available()
    return str(_status.get("why", ""))


def _self_test() -> tuple[bool, str]:
    if os.environ.get("SECUREINFER_CKKS_NATIVE", "1") == "0":
        return False, "disabled by SECUREINFER_CKKS_NATIVE=0"
    # the object header this module reads past is a release build's (16 bytes)
    if sys.implementation.name != "cpython" or hasattr(sys, "gettotalrefcount") \
            or sysconfig.get_config_var("Py_GIL_DISABLED"):
        return False, "needs a release build of CPython with the GIL (object layout)"
    try:
        from . import _native  # noqa: F401, PLC0415
    except ImportError as exc:
        return False, f"the extension is not built ({exc})"
    try:
        from .backend import ClientKeys, Seal  # noqa: PLC0415
        from .params import Params  # noqa: PLC0415

        seal = Seal(Params(1024, (30, 25, 30), 25, 1, 0))
        keys = ClientKeys(seal, [1, 3], False)
        values = np.random.default_rng(0).random(seal.slots) - 0.5
        ct = keys.encrypt(values)
        nat = Native(seal, keys.galois, [1, 3])
        sp = nat.split(ct)
        for step in (1, 3):
            got = keys.decrypt(nat.rotate(sp, step))
            # a wrong permutation or key gives errors ~0.5; the noise here is ~1e-3
            if not np.allclose(got, np.roll(values, -step), atol=2e-2):
                return False, f"self-test: rotation by {step} does not match (SEAL differs)"
        pts = [seal.encode(values * k, seal.top, 2.0 ** 20) for k in (1, 2)]
        got = keys.decrypt(nat.dot([ct, ct], nat.products(pts, seal.top + 1)))
        if not np.allclose(got, 3 * values * values, atol=2e-2):
            return False, "self-test: a sum of products does not match"
    except Exception as exc:  # noqa: BLE001 - any failure means: use SEAL's rotations
        return False, f"self-test failed ({type(exc).__name__}: {exc})"
    return True, ""
