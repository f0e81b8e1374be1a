"""Keras' downloadable sets (``mnist``, ``fashion_mnist``, ``cifar10``): the cache, the download, the readers.

The files live where Keras puts them (``$KERAS_HOME/datasets``). Offline and with no cached copy,
a load fails fast with :class:`DatasetUnavailable`, naming the cache folder.

Not ``keras.datasets.<name>.load_data()``, checked against Keras 3.15:

- it takes no cache folder. ``get_file`` uses the ``KERAS_HOME`` that Keras read when it was
  imported, so a ``KERAS_HOME`` set later (tests, notebooks) is ignored, and
  ``mnist.load_data(path=...)`` refuses a path ("Paths are no longer accepted");
- with a file missing it goes straight to ``urlretrieve``, which has no timeout. Offline, its DNS
  lookup or connect can wait for minutes, and its error ("URL fetch failure on ...") names
  neither the dataset nor the cache folder;
- ``cifar10.load_data`` looks only in Keras 3's ``cifar-10-batches-py-target`` layout, so a copy
  that tf.keras 2 downloaded is not found.

So the readers here are a few lines each (the same file formats Keras reads). The download
goes through ``urllib.request`` with a timeout on its own connection, so the
process-wide socket default is never touched. The archive is extracted by ``keras.utils.get_file``.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import socket
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.config import DataConfig
from toolkit.data.dataset import CLASSIFICATION, DatasetUnavailable, Loaded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _KerasSet:
    """Where a Keras dataset lives online and in the cache (mirrors ``keras.datasets``)."""

    files: tuple[str, ...]  # names under origin and under the cache subdirectory
    origin: str  # base URL
    subdir: str  # under the cache folder
    size: str  # shown to the user before a download
    samples: int
    features: int
    sha256: str | None = None  # of the single file, when Keras pins one
    extract: bool = False


_TF_KERAS = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
_KERAS_SETS = {
    "mnist": _KerasSet(
        files=("mnist.npz",),
        origin=_TF_KERAS,
        subdir="datasets",
        size="11 MB",
        samples=70_000,
        features=784,
        sha256="731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1",
    ),
    "fashion_mnist": _KerasSet(
        files=(
            "train-labels-idx1-ubyte.gz",
            "train-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
        ),
        origin=_TF_KERAS,
        subdir=os.path.join("datasets", "fashion-mnist"),
        size="30 MB",
        samples=70_000,
        features=784,
    ),
    "cifar10": _KerasSet(
        files=("cifar-10-python.tar.gz",),
        origin="https://www.cs.toronto.edu/~kriz/",
        subdir="datasets",
        size="163 MB",
        samples=60_000,
        features=3072,
        sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        extract=True,
    ),
}
_CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# How long the pre-flight reachability check and each socket operation of a download may wait.
CONNECT_TIMEOUT_S = 5.0
DOWNLOAD_SOCKET_TIMEOUT_S = 20.0
_CHUNK = 1 << 20  # bytes read, written and hashed at a time


def keras_home() -> Path:
    """Keras' cache folder, read now: ``$KERAS_HOME``, else ``~/.keras``.

    Keras itself reads ``KERAS_HOME`` once, when it is imported; reading it here on each call
    means the folder named in messages is the one actually used, and tests can point it at
    ``tmp_path``. Like Keras, fall back to ``/tmp/.keras`` when the folder is not writable.
    """
    home = Path(os.environ.get("KERAS_HOME") or Path("~/.keras").expanduser())
    probe = home
    while not probe.exists() and probe != probe.parent:  # a folder not made yet: can we make it?
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        home = Path(tempfile.gettempdir()) / ".keras"
    return home


def keras_cache_dir(name: str = "mnist") -> Path:
    """The folder that holds (or will hold) a Keras dataset's files."""
    return keras_home() / _KERAS_SETS[name].subdir


def _cifar10_dir(cache: Path) -> Path:
    """Where the extracted CIFAR-10 batches are: where tf.keras 2 put them (and so do we), or
    where Keras 3 does, so a copy that either downloaded is found."""
    candidates = (cache / "cifar-10-batches-py", cache / "cifar-10-batches-py-target" / "cifar-10-batches-py")
    return next((c for c in candidates if (c / "test_batch").is_file()), candidates[0])


def keras_cached(name: str) -> bool:
    """Whether a Keras dataset's files are already in the cache (so no network is needed)."""
    spec, cache = _KERAS_SETS[name], keras_cache_dir(name)
    if name == "cifar10":
        return (_cifar10_dir(cache) / "test_batch").is_file()
    return all((cache / f).is_file() for f in spec.files)


def _unreachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why ``url``'s host cannot be reached within ``timeout`` seconds, or None if it can.

    Offline, the DNS lookup can wait for minutes: ``getaddrinfo`` ignores socket timeouts,
    ``urlopen``'s included, so the check runs in a daemon thread that is abandoned if it takes
    too long.
    """
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(None)
        except OSError as exc:
            outcome.append(f"cannot reach {host}: {exc.strerror or exc}")

    thread = threading.Thread(target=probe, name="toolkit-reachability", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return outcome[0] if outcome else f"no answer from {host} within {timeout:g} s"


def _uses_proxy() -> bool:
    # Behind a proxy a direct connection may fail although urllib, which honours the proxy,
    # would succeed; then skip the pre-flight check and rely on the socket timeout.
    return any(os.environ.get(v) for v in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, target: Path, sha256: str | None) -> None:
    """Download ``url`` to ``target``: every socket operation times out, and only a complete file
    with the expected SHA-256 is put in place."""
    part = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    try:
        # The timeout is this connection's own. A fresh opener reads the *_proxy variables now;
        # urlopen's shared one keeps those of its first use.
        opener = urllib.request.build_opener()
        with opener.open(url, timeout=DOWNLOAD_SOCKET_TIMEOUT_S) as response, open(part, "wb") as out:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
        if sha256 and digest.hexdigest() != sha256:
            raise ValueError(f"{target.name} arrived with SHA-256 {digest.hexdigest()}, not the {sha256} Keras pins")
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)


def _fetch_problem(url: str, exc: Exception) -> str:
    """A download failure in one line."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"{url}: HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, Exception) else exc
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError since Python 3.10
        return f"{url}: no data for {DOWNLOAD_SOCKET_TIMEOUT_S:g} s"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{url}: {text}"


def _download(name: str) -> None:
    """Fetch a Keras dataset's files into the cache, failing fast and clearly when offline."""
    spec, cache = _KERAS_SETS[name], keras_cache_dir(name)
    hint = (
        f"Connect to the internet once to download it ({spec.size}), or copy "
        f"{', '.join(spec.files)} into {cache} (KERAS_HOME sets the cache folder)."
    )
    # A copied-in archive (CIFAR-10) only needs extracting; check the network only for a download.
    missing = [f for f in spec.files if not (cache / f).is_file()]
    reason = None if not missing or _uses_proxy() else _unreachable(spec.origin)
    if reason:
        raise DatasetUnavailable(f"dataset {name!r} is not cached in {cache} and cannot be downloaded ({reason}). {hint}")
    if missing:
        log.info("downloading %s (%s) into %s", name, spec.size, cache)
    cache.mkdir(parents=True, exist_ok=True)
    for fname in missing:
        url = spec.origin + fname
        try:
            _fetch(url, cache / fname, spec.sha256)
        except Exception as exc:  # urllib, socket, HTTP and hash errors all mean "could not fetch"
            raise DatasetUnavailable(
                f"dataset {name!r} is not cached in {cache} and could not be downloaded ({_fetch_problem(url, exc)}). {hint}"
            ) from None
    if spec.extract:
        _extract(name, cache, checked=set(missing))


def _extract(name: str, cache: Path, checked: set[str]) -> None:
    """Unpack a cached archive where the reader looks, with Keras' extraction (it refuses unsafe members)."""
    import keras

    spec = _KERAS_SETS[name]
    for fname in spec.files:
        # A copy put in by hand is checked here: given a hash that does not match, get_file would
        # download the file again with urlretrieve, which has no timeout.
        if spec.sha256 and fname not in checked and _sha256(cache / fname) != spec.sha256:
            raise DatasetUnavailable(
                f"dataset {name!r}: {cache / fname} is not the file Keras publishes (its SHA-256 differs). "
                "Delete it to download it again."
            )
        keras.utils.get_file(
            fname, origin=spec.origin + fname, cache_dir=str(keras_home()), cache_subdir=spec.subdir, extract=True
        )
    if name == "cifar10" and not keras_cached(name):
        # get_file extracts into "<archive stem>_extracted"; move the batches to where we look.
        extracted = next(cache.glob("cifar-10-python*extracted*/cifar-10-batches-py"), None)
        if extracted is not None:
            extracted.rename(_cifar10_dir(cache))


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else (CIFAR batches are pickles): no code runs.

    The same allow-list as Keras' ``RestrictedUnpickler``, which lives in the private
    ``keras.src.datasets.npz_utils`` and is not part of Keras' API.
    """

    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _read_keras(name: str, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a cached Keras dataset: all of train and test, as uint8 images and int labels."""
    if name == "mnist":
        with np.load(cache / "mnist.npz", allow_pickle=False) as f:
            return np.concatenate([f["x_train"], f["x_test"]]), np.concatenate([f["y_train"], f["y_test"]])
    if name == "fashion_mnist":
        parts = []
        for fname, offset in zip(_KERAS_SETS[name].files, (8, 16, 8, 16), strict=True):
            with gzip.open(cache / fname, "rb") as f:
                parts.append(np.frombuffer(f.read(), np.uint8, offset=offset))
        y_train, x_train, y_test, x_test = parts
        return np.concatenate([x_train, x_test]).reshape(-1, 28, 28), np.concatenate([y_train, y_test])
    xs, ys = [], []
    for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(_cifar10_dir(cache) / batch, "rb") as f:
            d = _ArraysOnly(f, encoding="bytes").load()
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(d[b"labels"]))
    return np.concatenate(xs), np.concatenate(ys)


def _keras(name: str) -> Callable[[DataConfig, int], Loaded]:
    def load(cfg: DataConfig, seed: int) -> Loaded:
        if not keras_cached(name):
            _download(name)
        cache = keras_cache_dir(name)
        try:
            x, y = _read_keras(name, cache)
        except Exception as exc:
            raise DatasetUnavailable(
                f"dataset {name!r}: the cached copy in {cache} cannot be read ({type(exc).__name__}: {exc}). "
                "Delete it to download it again."
            ) from None
        # Raw pixels (0-255) as (N, H, W, C) images: every model scales them inside itself, so a
        # logged champion serves the pixels a user has.
        x = x.astype("float32")
        if x.ndim == 3:
            x = x[..., None]  # one channel
        y = y.reshape(-1).astype("int64")
        names = {"cifar10": _CIFAR10_NAMES, "fashion_mnist": _FASHION_NAMES}.get(name) or [str(i) for i in range(10)]
        return x, y, CLASSIFICATION, names, None

    return load
