"""Restore whole collections: the library half of the pipeline (no Prefect here).

discover -> plan (header + content hash) -> skip what a previous run already did -> shards of
whole images packed by patch count -> restore a shard on one device, writing each restored
image to a work area -> assemble (metrics, atomic write in the input's format, clean-up) ->
Parquet manifest (one row per input per run). `flows/restore_collection.py` orchestrates these.
"""

from __future__ import annotations

import hashlib
import contextlib
import errno
import io
import json
import logging
import os
import posixpath
import re
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import lru_cache
import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from PIL import UnidentifiedImageError

from gdp import __version__
from gdp.limits import check_memory, check_size
from gdp.io import IMAGE_EXTENSIONS, ImageError, _write_atomic, list_images, read_image, read_info, relative_path, write_image

_log = logging.getLogger(__name__)
MANIFEST_DIR = "_manifests"
WORK_DIR = "_work"
MASK_SUFFIX = ".mask.png"
# Under MANIFEST_DIR, hidden from dataset readers (pyarrow skips names that start with "_"):
SHARD_MANIFEST_DIR = "_shards"  # partial manifests of child runs (a sharded run merges them into its own)
JOURNAL_DIR = "_journal"  # one row per finished input, written at once; dropped with the run's manifest


@dataclass(frozen=True)
class Settings:
    """Everything that decides a restoration's result (hashed into `config_hash`) plus how to run it."""

    task: str = "sr"
    options: dict = field(default_factory=dict)  # operator options (make_operator keywords)
    prior: str = "default"
    preset: str | None = None
    steps: int = 100
    seed: int = 0
    guidance: str = "x0"
    scale: float | None = None
    data_step: str = "auto"  # gdp.restore.default_guidance: the measured data step per task
    sigma_y: float = 0.0
    cg_iters: int | None = None
    precision: str = "fp32"  # the network's (auto: bf16 where the hardware has it, gdp.prior.denoiser)
    samples: int = 1
    tiling: str = "auto"
    patch: int | None = None
    stride: int | None = None
    blend: str = "smooth"
    mask: str = "sidecar"  # inpaint: "sidecar" (IMAGE.mask.png), or a mask URI for every image
    # execution only (not hashed)
    batch_size: int = 8
    storage_options: dict = field(default_factory=dict, repr=False)
    retry_seconds: float = 120.0  # how long one storage operation is retried through an outage (RETRY_DELAYS)
    max_output_megapixels: float = 100.0  # larger outputs are refused from the header (gdp.limits)

    def result_config(self, prior_id: str) -> dict:
        keys = ("task", "options", "steps", "seed", "guidance", "scale", "data_step", "sigma_y", "cg_iters",
                "precision", "samples", "tiling", "patch", "stride", "blend", "mask")
        return {"gdp": __version__, "prior_id": prior_id, **{k: getattr(self, k) for k in keys}}

    def config_hash(self, prior_id: str) -> str:
        blob = json.dumps(self.result_config(prior_id), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ImageJob:
    """One input image and where its results go (small, JSON-able: passed between tasks)."""

    source_uri: str
    relpath: str
    output_uri: str
    width: int = 0
    height: int = 0
    n_patches: int = 0
    content_sha256: str = ""
    status: str = "pending"  # pending | skipped | failed
    error: str = ""
    mode: str = ""  # tiling mode: single | fused | hierarchical
    memory_bytes: int = 0  # gdp.limits.estimate_bytes of restoring it


# ---------------------------------------------------------------------------------------------
# discover and plan


def discover(input_uri: str, pattern: str = "**/*", max_images: int | None = None,
             storage_options: dict | None = None, retry_seconds: float = Settings.retry_seconds,
             output_uri: str | None = None) -> list[str]:
    """Image URIs under input_uri (sorted), without inpainting sidecar masks, and without anything
    under `output_uri` when the output lies inside the input (a run's outputs are not inputs)."""
    found = retrying(retry_seconds, list_images, input_uri, pattern, **(storage_options or {}))
    uris = [u for u in found if not u.endswith(MASK_SUFFIX)]
    if output_uri and _inside(output_uri, input_uri):
        out = _location(output_uri)
        uris = [u for u in uris if not _below(_location(u)[1], out[1]) or _location(u)[0] != out[0]]
    return uris[:max_images] if max_images else uris


def _location(uri: str) -> tuple[str, str]:
    """(protocol, normalised absolute path) of a URI, for comparing locations."""
    protocol, path = fsspec.core.split_protocol(uri)
    if protocol in (None, "file", "local"):
        return "file", os.path.realpath(path)
    return protocol, posixpath.normpath("/" + path)


def _inside(uri: str, other: str) -> bool:
    a, b = _location(uri), _location(other)
    return a[0] == b[0] and _below(a[1], b[1])


def check_collection(input_uri: str, output_uri: str, pattern: str = "**/*", storage_options: dict | None = None,
                     retry_seconds: float = Settings.retry_seconds) -> list[str]:
    """The inputs of a run, or ValueError (one line) before anything is written: the input does not
    exist, nothing under it matches `pattern`, or the input and output folders are the same or
    the input lies inside the output (outputs would land on inputs)."""
    if _location(input_uri) == _location(output_uri):
        raise ValueError(f"{output_uri}: the output is the input folder; choose another output")
    if _inside(input_uri, output_uri):
        raise ValueError(f"{input_uri}: the input lies inside the output {output_uri}, so outputs could land on "
                         "inputs; choose an output outside it")
    fs, root = fsspec.core.url_to_fs(input_uri, **(storage_options or {}))
    if not retrying(retry_seconds, fs.exists, root):
        raise ValueError(f"{input_uri}: no such file, folder or prefix")
    uris = discover(input_uri, pattern, None, storage_options, retry_seconds, output_uri)
    if not uris:
        raise ValueError(f"{input_uri}: no image matches the pattern {pattern!r} (extensions "
                         f"{', '.join(IMAGE_EXTENSIONS)}); nothing to restore")
    return uris


def join_uri(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/") or base[:1], *parts)


# First path segments that belong to the pipeline under an output root: no input may write there.
RESERVED_NAMES = frozenset({MANIFEST_DIR, WORK_DIR})


class UnsafePathError(ValueError):
    """An input's relative path that would write outside the output root, or into its reserved folders."""


def unsafe_relpath(relpath: str) -> str:
    """Why `relpath` may not be joined to an output root ('' when it may).

    Only canonical relative paths pass: no leading '/', no empty, '.' or '..' segment, no
    backslash (a separator on Windows), no control character, no drive letter, not under a
    reserved folder. That refuses every path that normalises outside the root on any backend (a
    local disk, S3 and other object stores, where such keys are legal), and every path that
    normalises to another input's output."""
    if not relpath:
        return "its relative path is empty"
    if relpath.startswith("/"):
        return "its relative path is absolute"
    if any(ord(c) < 32 or ord(c) == 127 for c in relpath):
        return "its relative path holds a control character"
    if "\\" in relpath:
        return "its relative path holds a backslash"
    segments = relpath.split("/")
    if ".." in segments:
        return "its relative path has a '..' segment"
    if "." in segments or "" in segments:
        return "its relative path is not canonical (an empty or '.' segment)"
    if re.match(r"^[A-Za-z]:", segments[0]):
        return "its relative path starts with a drive letter"
    if segments[0] in RESERVED_NAMES:
        return f"its relative path is inside the reserved folder {segments[0]}/"
    return ""


def output_uri_for(output_root: str, relpath: str) -> str:
    """The one place where an output location is made: the root joined with a checked relative path.

    Raises UnsafePathError for a relative path that `unsafe_relpath` refuses, and (belt and braces)
    for a joined path that does not normalise to below the root, or that resolves outside it
    through a symbolic link already present in a local output tree."""
    problem = unsafe_relpath(relpath)
    if problem:
        raise UnsafePathError(f"{problem} ({relpath!r}); nothing is written for it")
    uri = join_uri(output_root, relpath)
    protocol, root = fsspec.core.split_protocol(output_root)
    _, path = fsspec.core.split_protocol(uri)
    root = posixpath.normpath(root or "/")
    if not _below(posixpath.normpath(path), root):
        raise UnsafePathError(f"{relpath!r} normalises outside the output root {output_root}")
    if protocol in (None, "file", "local"):  # a link already in the output tree must not lead out of it
        root, parent = os.path.abspath(root), os.path.dirname(os.path.abspath(path))
        while not os.path.lexists(parent) and _below(parent, root):
            parent = os.path.dirname(parent)
        if _below(parent, root) and not _below(os.path.realpath(parent), os.path.realpath(root), equal=True):
            raise UnsafePathError(f"{relpath!r} leads outside the output root {output_root} through a symbolic link")
    return uri


def _below(path: str, root: str, equal: bool = False) -> bool:
    """Whether normalised `path` is strictly below normalised `root` (or equal to it, with `equal`)."""
    return (equal and path == root) or path.startswith(root.rstrip("/") + "/")


def sha256_uri(uri: str, storage_options: dict | None = None, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with fsspec.open(uri, "rb", **(storage_options or {})) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def plan_image(uri: str, input_uri: str, output_root: str, settings: Settings, native: int,
               max_pixels: int | None = None) -> ImageJob:
    """Header-only plan of one input (size, patches) plus its content hash. Storage hiccups are
    retried (`retrying`); any error of this one file, after that, is a failed job, never an exception."""
    job = ImageJob(uri, "", "")
    try:
        rel = relative_path(input_uri, uri) if uri != input_uri else posixpath.basename(uri)
        job = replace(job, relpath=rel)
        job = replace(job, output_uri=output_uri_for(output_root, rel))
        return retrying(settings.retry_seconds, _plan_one, job, settings, native, max_pixels)
    except Exception as e:  # this file's problem, whatever it is: a row, and the other inputs go on
        return replace(job, status="failed", error=describe(uri, e))


def _plan_one(job: ImageJob, settings: Settings, native: int, max_pixels: int | None) -> ImageJob:
    from gdp.operators import make_operator
    from gdp.restore import plan_tiling
    kwargs = {"max_pixels": max_pixels} if max_pixels else {}
    info = read_info(job.source_uri, **kwargs, **settings.storage_options)
    sha = sha256_uri(job.source_uri, settings.storage_options)
    op = make_operator(settings.task, **_options_for_shape(settings))
    _, _, h, w = op.x_shape((1, info.channels, info.height, info.width))
    plan = plan_tiling(max(h, native), max(w, native), native, settings.tiling, settings.patch, settings.stride)
    need = check_size(job.source_uri, info.width, info.height, w, h, plan["mode"], settings.max_output_megapixels)
    return replace(job, width=w, height=h, n_patches=plan["n_patches"], mode=plan["mode"], content_sha256=sha,
                   memory_bytes=need)


def _options_for_shape(settings: Settings) -> dict:
    """Operator options good enough to compute shapes (masks are per image and do not change them)."""
    opts = dict(settings.options)
    if settings.task == "inpaint":
        opts = {"ratio": 0.0} if not {"ratio", "box"} & set(opts) else opts
    return opts


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, (ImageError, ValueError)) else f"{type(e).__name__}: {text}"


def describe(uri: str, e: BaseException) -> str:
    """One line naming the file and the problem."""
    text = one_line(e)
    return text if text.startswith(uri) else f"{uri}: {text}"


# ---------------------------------------------------------------------------------------------
# transient errors and retries

# errno values of a storage or network hiccup (s3fs maps S3's 500 to EIO and 503/SlowDown to EBUSY)
_TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.EBUSY, errno.ECONNABORTED, errno.ECONNREFUSED, errno.ECONNRESET,
                               errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.EIO, errno.ENETDOWN, errno.ENETRESET,
                               errno.ENETUNREACH, errno.EPIPE, errno.ETIMEDOUT})
_TRANSIENT_S3_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling",
                                 "ThrottlingException", "503", "500"})
_DEVICE_WORDS = ("CUDA", "cuDNN", "CUBLAS", "NCCL", "HIP error", "device-side", "ECC error")
# waits between attempts of one storage operation (then the last one, repeated) until retry_seconds
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)


@lru_cache(maxsize=1)
def _client_errors() -> tuple[type, ...]:
    """The storage clients' own connection and timeout errors (none of them is an OSError)."""
    types: list[type] = []
    try:
        from botocore import exceptions as b
        types += [b.ConnectionError, b.HTTPClientError, b.IncompleteReadError, b.ResponseStreamingError]
    except ImportError:  # pragma: no cover - s3fs brings botocore
        pass
    try:
        import aiohttp
        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ServerTimeoutError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _chain(e: BaseException | None):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_transient(e: BaseException | None) -> bool:
    """Whether an error is worth retrying: a storage or network hiccup (the builtin connection and
    timeout errors, botocore's EndpointConnectionError, ConnectionClosedError and read/connect
    timeouts, aiohttp's connection errors, S3's 500/503/SlowDown, OSErrors with a network errno),
    or a device error. Never bad input (ImageError, ValueError), a missing or forbidden file, a
    full disk, running out of memory, or a programming error."""
    if e is None or _out_of_memory(e):
        return False
    for link in _chain(e):
        if isinstance(link, (ConnectionError, TimeoutError)) or isinstance(link, _client_errors()):
            return True
        if isinstance(link, OSError) and link.errno in _TRANSIENT_ERRNOS:
            return True
        response = getattr(link, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if code in _TRANSIENT_S3_CODES or status >= 500 or status == 429:
                return True
        if type(link) is RuntimeError and any(w in str(link) for w in _DEVICE_WORDS):
            return True
    return False


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and (
        "out of memory" in str(e) or "can't allocate memory" in str(e) or "not enough memory" in str(e)))


def retrying(budget: float, fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, called again after a transient error (`is_transient`) with the waits of
    RETRY_DELAYS until `budget` seconds have passed; then, or on any other error, it raises."""
    start, attempt = time.monotonic(), 0
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
            if not is_transient(e) or time.monotonic() - start + delay > budget:
                raise
            _log.warning("transient storage error (%s); attempt %d again in %.1f s", one_line(e), attempt + 2, delay)
            time.sleep(delay)
            attempt += 1


def previous_successes(output_root: str, storage_options: dict | None = None,
                       retry_seconds: float = Settings.retry_seconds) -> dict[tuple[str, str, str], set[str]]:
    """{(output_uri, content_sha256, config_hash): {output_sha256, ...}} of every ok row under
    output_root/_manifests: run manifests, child runs' partial manifests and journals. Rows written
    before manifests held the output's hash (no output_sha256) count for nothing."""
    return retrying(retry_seconds, _previous_successes, output_root, storage_options)


def _previous_successes(output_root: str, storage_options: dict | None) -> dict[tuple[str, str, str], set[str]]:
    import pyarrow.parquet as pq
    fs, root = fsspec.core.url_to_fs(join_uri(output_root, MANIFEST_DIR), **(storage_options or {}))
    if not fs.exists(root):
        return {}
    wanted = ["status", "output_uri", "content_sha256", "config_hash", "output_sha256"]
    done: dict[tuple[str, str, str], set[str]] = {}
    for path in sorted(p for p in fs.find(root) if p.endswith(".parquet")):
        table = pq.read_table(io.BytesIO(fs.cat_file(path)))
        if not set(wanted) <= set(table.column_names):
            continue
        for r in table.select(wanted).to_pylist():
            if r["status"] == "ok" and r["output_sha256"]:
                done.setdefault((r["output_uri"], r["content_sha256"], r["config_hash"]), set()).add(r["output_sha256"])
    return done


def already_done(job: ImageJob, config_hash: str, done: dict, storage_options: dict | None = None,
                 retry_seconds: float = Settings.retry_seconds) -> str:
    """The output's sha256 when an earlier ok row restored this very input (same output path, same
    content, same configuration) and the output still holds the bytes that row wrote; '' otherwise
    (then the input is restored again: changed, moved, replaced, or its output lost or damaged)."""
    hashes = done.get((job.output_uri, job.content_sha256, config_hash))
    if not hashes:
        return ""
    try:
        sha = retrying(retry_seconds, sha256_uri, job.output_uri, storage_options)
    except FileNotFoundError:
        return ""
    return sha if sha in hashes else ""


def make_shards(jobs: list[ImageJob], shard_patches: int) -> list[list[ImageJob]]:
    """Pack whole images (fused sampling keeps an image's patches together) into shards of
    about `shard_patches` patches, largest images first; a bigger image is a shard of its own."""
    shards: list[list[ImageJob]] = []
    current, size = [], 0
    for job in sorted(jobs, key=lambda j: -j.n_patches):
        if current and size + job.n_patches > shard_patches:
            shards.append(current)
            current, size = [], 0
        current.append(job)
        size += job.n_patches
    if current:
        shards.append(current)
    return shards


def split_balanced(jobs: list[ImageJob], n: int) -> list[list[ImageJob]]:
    """At most `n` non-empty groups of whole images with about equal planned work (patches): largest
    image first, each to the group with the least work so far (LPT)."""
    groups: list[list[ImageJob]] = [[] for _ in range(min(n, len(jobs)))]
    work = [0] * len(groups)
    for job in sorted(jobs, key=lambda j: -j.n_patches):
        k = work.index(min(work))
        groups[k].append(job)
        work[k] += max(job.n_patches, 1)
    return groups


# ---------------------------------------------------------------------------------------------
# the output prefix's lease: one run at a time writes under an output root

LEASE_DIR = "_lease"  # under MANIFEST_DIR: one JSON file per generation, g-<n>.json; the highest is the lease
LEASE_SECONDS = 120.0  # a holder that stops renewing is presumed dead this long after its last renewal


class LeaseHeldError(ValueError):
    """Another live run holds the output root."""


def _host() -> str:
    import socket
    return socket.gethostname()


def _process_start(pid: int) -> str:
    """The start time of a process (Linux: /proc/<pid>/stat field 22), '' where unknown: tells a
    reused pid from the process that wrote a lease."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _holder_alive(holder: dict, now: float) -> bool:
    """Whether a lease's holder may still be writing: it renewed within its lease time, and, when it
    ran on this host, its process still exists (a run killed with -9 frees the output at once here;
    on another host, after LEASE_SECONDS)."""
    if float(holder.get("expires", 0)) < now:
        return False
    if holder.get("host") == _host():
        pid = int(holder.get("pid", 0))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        start = holder.get("process_start", "")
        if start and _process_start(pid) and _process_start(pid) != start:
            return False
    return True


class Lease:
    """The output root's lease, held by one run: generation files OUTPUT/_manifests/_lease/g-<n>.json,
    each created exclusively (O_EXCL on a local disk, a conditional PUT `If-None-Match: *` on S3),
    so of two runs that start together exactly one gets generation n+1. The holder renews its file
    every LEASE_SECONDS/4 from a thread; a later generation, or its generation's file holding
    another holder's token, means it lost the lease (`lost`). Release deletes the file."""

    def __init__(self, output_root: str, run_id: str, storage_options: dict | None = None,
                 seconds: float = LEASE_SECONDS, retry_seconds: float = Settings.retry_seconds):
        self.root = join_uri(output_root, MANIFEST_DIR, LEASE_DIR)
        self.run_id, self.seconds, self.retry_seconds = run_id, seconds, retry_seconds
        self.storage_options = storage_options or {}
        self.generation = 0
        self.token = uuid.uuid4().hex  # tells this holder's file from a later holder's of the same generation
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- files
    def _fs(self):
        return fsspec.core.url_to_fs(self.root, **self.storage_options)

    def _generations(self) -> list[int]:
        fs, root = self._fs()
        try:
            names = [posixpath.basename(p) for p in fs.ls(root, detail=False, refresh=True)]
        except FileNotFoundError:
            return []
        return sorted(int(n[2:-5]) for n in names if re.fullmatch(r"g-\d{12}\.json", n))

    def _path(self, n: int) -> str:
        return join_uri(self._fs()[1], f"g-{n:012d}.json")

    def _read(self, n: int) -> dict:
        fs, _ = self._fs()
        try:
            return json.loads(fs.cat_file(self._path(n)))
        except (FileNotFoundError, ValueError):
            return {}  # gone, or caught half-written on a local disk (renewals rewrite in place)

    def _stale(self, n: int) -> bool:
        """An unreadable generation file (its writer died between creating and writing it, on a local
        disk) counts as dead once it is older than 10 s."""
        fs, _ = self._fs()
        try:
            modified = fs.modified(self._path(n))
        except FileNotFoundError:
            return True
        stamp = modified.timestamp() if modified.tzinfo else modified.replace(tzinfo=timezone.utc).timestamp()
        return time.time() - stamp > 10

    def _document(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "token": self.token, "host": _host(), "pid": os.getpid(),
                           "process_start": _process_start(os.getpid()),
                           "expires": time.time() + self.seconds}).encode()

    def _create(self, n: int) -> None:
        """Create generation n exclusively; FileExistsError if another run did first."""
        fs, _ = self._fs()
        path = self._path(n)
        if isinstance(fs, LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "xb") as f:
                f.write(self._document())
        else:
            fs.pipe_file(path, self._document(), mode="create")

    # -- acquire, renew, release
    def acquire(self) -> "Lease":
        """Take the lease, or raise LeaseHeldError naming the live holder."""
        return retrying(self.retry_seconds, self._acquire)

    def _acquire(self) -> "Lease":
        for _ in range(3):
            generations = self._generations()
            top = generations[-1] if generations else 0
            holder = self._read(top) if top else {}
            if top and holder.get("run_id") != self.run_id and (
                    _holder_alive(holder, time.time()) if holder else not self._stale(top)):
                raise self._held(holder)
            try:
                self._create(top + 1)
            except FileExistsError:
                continue  # another run took generation top + 1 first: look again
            self.generation = top + 1
            for n in generations:  # earlier generations are history
                with contextlib.suppress(FileNotFoundError):
                    self._fs()[0].rm_file(self._path(n))
            self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.run_id}", daemon=True)
            self._thread.start()
            return self
        raise LeaseHeldError(f"{self.root}: the output's lease keeps changing hands; another run is starting on "
                             "it: try again later")

    def _held(self, holder: dict) -> LeaseHeldError:
        if not holder:
            return LeaseHeldError(f"{self.root}: another run is taking the output's lease right now; concurrent "
                                  "runs on one output are refused (docs/RELIABILITY.md)")
        left = max(0.0, float(holder.get("expires", 0)) - time.time())
        return LeaseHeldError(
            f"{self.root}: run {holder.get('run_id')} (host {holder.get('host')}, pid {holder.get('pid')}) is "
            f"writing this output (its lease runs {left:.0f} s more unless renewed); concurrent runs on one output "
            "are refused: wait for it to end, or choose another output")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            try:
                self.renew()
            except Exception as e:  # a missed renewal is survivable: the lease runs LEASE_SECONDS
                _log.warning("could not renew the lease on %s: %s", self.root, one_line(e))

    def renew(self) -> None:
        """Push the expiry on, unless a later generation exists (then the lease is lost: `lost`)."""
        if self.lost or self._stop.is_set():
            return
        if self._generations()[-1:] != [self.generation] or self._read(self.generation).get("token") != self.token:
            self.lost = True
            _log.error("run %s lost the lease on %s to a later run", self.run_id, self.root)
            return
        _put_atomic(self._fs()[0].unstrip_protocol(self._path(self.generation)), self._document(), self.storage_options)

    def release(self) -> None:
        """Stop renewing and remove this run's generation file (the output is free at once)."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self.generation and not self.lost:
            with contextlib.suppress(FileNotFoundError):
                retrying(self.retry_seconds, self._fs()[0].rm_file, self._path(self.generation))

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------
# what a dead run left: its work folder, its journal, temporary files


def recover(output_root: str, run_id: str, storage_options: dict | None = None,
            retry_seconds: float = Settings.retry_seconds) -> dict:
    """Tidy an output root after runs that died, under this run's lease (so none of them is live):
    the journal of a run without a manifest becomes that run's manifest (its finished images, with
    their metrics), a journal whose manifest exists is dropped, other runs' work folders are
    removed, and temporary files in _manifests (a crash mid-write) are deleted. Returns counts."""
    return retrying(retry_seconds, _recover, output_root, run_id, storage_options or {}, retry_seconds)


def _recover(output_root: str, run_id: str, storage_options: dict, retry_seconds: float) -> dict:
    fs, manifests = fsspec.core.url_to_fs(join_uri(output_root, MANIFEST_DIR), **storage_options)
    done = {"journals_merged": 0, "rows_merged": 0, "work_folders_removed": 0, "temporary_files_removed": 0}
    journals = join_uri(manifests, JOURNAL_DIR)
    for folder in _listing(fs, journals):
        name = posixpath.basename(folder.rstrip("/"))
        if name == f"run-{run_id}" or not name.startswith("run-"):
            continue
        manifest = join_uri(manifests, f"{name}.parquet")
        if not fs.exists(manifest) and not fs.exists(join_uri(manifests, SHARD_MANIFEST_DIR, f"{name}.parquet")):
            rows = [r for path in sorted(fs.find(folder)) if path.endswith(".parquet")
                    for r in read_manifest(fs.unstrip_protocol(path), storage_options, retry_seconds)]
            _write_rows(rows, fs.unstrip_protocol(manifest), storage_options, retry_seconds)
            done["journals_merged"] += 1
            done["rows_merged"] += len(rows)
        fs.rm(folder, recursive=True)
    for folder in _listing(fs, join_uri(posixpath.dirname(manifests), WORK_DIR)):
        if posixpath.basename(folder.rstrip("/")) != run_id:
            fs.rm(folder, recursive=True)
            done["work_folders_removed"] += 1
    for path in _listing(fs, manifests, files=True):
        name = posixpath.basename(path)
        if name.endswith(".tmp") or ".tmp-" in name:
            fs.rm_file(path)
            done["temporary_files_removed"] += 1
    return done


def _listing(fs, path: str, files: bool = False) -> list[str]:
    """Folders (or files) directly under `path`; [] when there is none."""
    try:
        entries = fs.ls(path, detail=True, refresh=True)
    except FileNotFoundError:
        return []
    kind = "file" if files else "directory"
    return [e["name"] for e in entries if e.get("type") == kind and e["name"].rstrip("/") != path.rstrip("/")]


# ---------------------------------------------------------------------------------------------
# restore a shard on one device

_PRIOR_LOCK = threading.Lock()
_DEVICE_LOCKS: dict[str, threading.Lock] = {}


def device_lock(device: str) -> threading.Lock:
    """One lock per device in this process: tasks on threads take turns on a GPU."""
    with _PRIOR_LOCK:
        return _DEVICE_LOCKS.setdefault(device, threading.Lock())


@lru_cache(maxsize=4)
def _cached_prior(source: str, preset: str | None, device: str, precision: str):
    from gdp.prior.checkpoint import load_prior
    from gdp.prior.denoiser import resolve_precision
    prior = load_prior(source, preset=preset, device=device)
    chosen = resolve_precision(precision, device)
    return prior.set_precision(chosen, channels_last=chosen != "fp32")


def cached_prior(source: str, preset: str | None, device: str, precision: str = "fp32"):
    """The prior, loaded once per worker process, device and precision (auto: bf16 where native)."""
    with _PRIOR_LOCK:
        return _cached_prior(source, preset, device, precision)


def prior_loads() -> int:
    """How many priors this process has loaded from storage (cache misses of `cached_prior`)."""
    return _cached_prior.cache_info().misses


def resolve_device(name: str) -> str:
    """Device name for task names and locks ("auto" resolved)."""
    from gdp.prior.checkpoint import resolve_device as to_device
    return str(to_device(name))


@dataclass(frozen=True)
class ImageResult:
    """What a shard reports for one image: the restored pixels' location in the work area, or an error."""

    job: ImageJob
    work_uri: str = ""
    nfe: int = 0
    seconds: float = 0.0
    consistency_psnr: float | None = None
    tiling: dict = field(default_factory=dict)
    error: str = ""
    parts: tuple[str, ...] = ()  # hierarchical: work files of window batches, merged by `assemble`
    estimated: str = "{}"  # blind tasks: the estimated degradation parameters (JSON)
    retry: bool = False  # the error was transient: restore this image again


def restore_shard(jobs: list[ImageJob], settings: Settings, work_root: str, device: str = "auto",
                  progress=None) -> list[ImageResult]:
    """Restore every image of a shard on `device`; never raises for one image.

    An image's own problem (bad input, out of memory, anything not transient) is its error result.
    Storage hiccups are retried per operation (`retrying`); a transient error that outlasts that,
    or a device error, stops the shard: the images restored so far keep their results and the
    others get `retry=True` results, which the orchestrator restores again in a new shard.
    """
    device = resolve_device(device)
    prior = cached_prior(settings.prior, settings.preset, device, settings.precision)
    results = []
    with device_lock(device):
        for k, job in enumerate(jobs):
            try:
                results.append(_restore_one(job, settings, prior, work_root))
            except Exception as e:
                if is_transient(e):
                    results += [ImageResult(j, error=describe(j.source_uri, e), retry=True) for j in jobs[k:]]
                    break
                results.append(ImageResult(job, error=describe(job.source_uri, e)))
            if progress:
                progress(job)
    return results


def _operator_for(job: ImageJob, settings: Settings):
    from gdp.operators import make_operator
    opts = dict(settings.options)
    if settings.task == "inpaint" and not {"ratio", "box", "mask_file"} & set(opts):
        opts["mask_file"] = job.source_uri.rsplit(".", 1)[0] + MASK_SUFFIX if settings.mask == "sidecar" else settings.mask
    try:
        return make_operator(settings.task, **opts)
    except (FileNotFoundError, UnidentifiedImageError, ImageError) as e:  # a missing/unreadable mask: bad input
        problem = e.problem if isinstance(e, ImageError) else type(e).__name__
        raise ImageError(job.source_uri, f"cannot read the inpainting mask {opts.get('mask_file')} "
                                         f"({problem})") from e


def _restore_one(job: ImageJob, settings: Settings, prior, work_root: str) -> ImageResult:
    from gdp.restore import prepare_observation, restore
    check_memory(job.source_uri, job.memory_bytes, f"{job.width}x{job.height} {job.mode}")  # again: memory now
    img = retrying(settings.retry_seconds, read_image, job.source_uri, **settings.storage_options)
    op = retrying(settings.retry_seconds, _operator_for, job, settings)
    y, gray = prepare_observation(img.pixels, settings.task, op)
    guidance = _guidance(settings)
    result = restore(y, settings.task, prior, operator=op, steps=settings.steps, seed=[settings.seed],
                     guidance=guidance, samples=settings.samples, tiling=settings.tiling, patch=settings.patch,
                     stride=settings.stride, batch_size=settings.batch_size, blend=settings.blend)
    work_uri = join_uri(work_root, hashlib.sha1(job.relpath.encode()).hexdigest()[:16] + ".safetensors")
    _save_tile(work_uri, result.image[0].cpu(), {"gray": str(gray), "bit_depth": str(img.bit_depth)},
               settings.storage_options, settings.retry_seconds)
    estimated = json.dumps(result.params["per_image"][0]) if result.params else "{}"
    return ImageResult(job, work_uri, result.nfe, result.seconds, float(result.consistency_psnr[0]), result.tiling,
                       estimated=estimated)


def _save_tile(uri: str, pixels: torch.Tensor, meta: dict, storage_options: dict,
               retry_seconds: float = Settings.retry_seconds) -> None:
    from safetensors.torch import save
    retrying(retry_seconds, _put_atomic, uri, save({"pixels": pixels.contiguous()}, metadata=meta), storage_options)


def _load_tile(uri: str, storage_options: dict, retry_seconds: float = Settings.retry_seconds) -> tuple[torch.Tensor, dict]:
    from safetensors.torch import load
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    data = retrying(retry_seconds, fs.cat_file, path)
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + header_len]).get("__metadata__", {})
    return load(data)["pixels"], meta


# ---------------------------------------------------------------------------------------------
# hierarchical images: a coarse pass per image, then window batches spread over shards


@dataclass(frozen=True)
class WindowBatch:
    """Windows `indices` of one hierarchical image: the unit that shards are made of."""

    job: ImageJob
    indices: tuple[int, ...]


def image_key(job: ImageJob) -> str:
    return hashlib.sha1(job.relpath.encode()).hexdigest()[:16]


def _observation(job: ImageJob, settings: Settings):
    from gdp.restore import prepare_observation
    img = retrying(settings.retry_seconds, read_image, job.source_uri, **settings.storage_options)
    op = retrying(settings.retry_seconds, _operator_for, job, settings)
    y, gray = prepare_observation(img.pixels, settings.task, op)
    return img, op, y, gray


def _hierarchical_plan(job: ImageJob, settings: Settings, native: int, op):
    from gdp.hierarchical import plan_hierarchical
    align = op.factor if getattr(op, "name", "") == "sr" else 1
    return plan_hierarchical(job.height, job.width, settings.patch or native, settings.stride, align)


def _guidance(settings: Settings):
    from gdp.restore import default_guidance
    return default_guidance(settings.task, scale=settings.scale, mode=settings.guidance, data_step=settings.data_step,
                            sigma_y=settings.sigma_y, cg_iters=settings.cg_iters)


def coarse_pass(job: ImageJob, settings: Settings, work_root: str, device: str = "auto") -> tuple[str, int, float]:
    """The global pass of one hierarchical image: (work URI of the coarse result, NFE, seconds)."""
    from gdp.hierarchical import global_pass
    device = resolve_device(device)
    prior = cached_prior(settings.prior, settings.preset, device, settings.precision)
    _, op, y, _ = _observation(job, settings)
    plan = _hierarchical_plan(job, settings, prior.image_size, op)
    with device_lock(device):
        t0 = time.perf_counter()
        coarse, nfe = global_pass(y.to(device), op, prior, plan, settings.steps, settings.seed, _guidance(settings),
                                  settings.batch_size)
    uri = join_uri(work_root, image_key(job) + ".coarse.safetensors")
    seconds = time.perf_counter() - t0
    meta = {}
    if getattr(op, "blind", False):  # the global pass's estimate, used fixed by every window (exact in JSON)
        meta = {"params": json.dumps({k: v.cpu().tolist() for k, v in op.params.items()}),
                "estimated": json.dumps(op.describe()[0])}
    _save_tile(uri, coarse[0].cpu(), meta, settings.storage_options, settings.retry_seconds)
    return uri, nfe, seconds


def bind_estimate(op, meta: dict) -> None:
    """Give a blind operator the parameters that the coarse pass estimated (saved in its tile)."""
    if getattr(op, "blind", False):
        op.bind({k: torch.tensor(v) for k, v in json.loads(meta["params"]).items()})


def window_batches(jobs: list[ImageJob], shard_patches: int) -> list[list[WindowBatch]]:
    """Shards of about `shard_patches` windows, from one or several hierarchical images."""
    shards, current, size = [], [], 0
    for job in jobs:
        start = 0
        while start < job.n_patches:
            take = min(job.n_patches - start, shard_patches - size)
            current.append(WindowBatch(job, tuple(range(start, start + take))))
            start, size = start + take, size + take
            if size >= shard_patches:
                shards.append(current)
                current, size = [], 0
    if current:
        shards.append(current)
    return shards


def split_windows(n_patches: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous ranges [lo, hi) of window indices 0..n_patches-1, sizes differing by at most
    one (empty ranges when there are fewer windows than parts)."""
    q, r = divmod(n_patches, parts)
    bounds = [0]
    for k in range(parts):
        bounds.append(bounds[-1] + q + (k < r))
    return [(bounds[k], bounds[k + 1]) for k in range(parts)]


def write_json(uri: str, value, storage_options: dict | None = None, retry_seconds: float = Settings.retry_seconds) -> None:
    """Write a small JSON document in one piece."""
    retrying(retry_seconds, _put_atomic, uri, json.dumps(value).encode(), storage_options)


def _put_atomic(uri: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write `data` so that readers see the whole file or none (`gdp.io`'s atomic write: a hidden
    temporary file beside it, fsynced and renamed, removed if the write fails, on a local disk; an
    object store's single PUT already is)."""
    _write_atomic(uri, data, storage_options or {})


def read_json(uri: str, storage_options: dict | None = None, retry_seconds: float = Settings.retry_seconds):
    """The JSON document at `uri`, or None when there is none."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    try:
        return json.loads(retrying(retry_seconds, fs.cat_file, path))
    except FileNotFoundError:
        return None


def restore_window_batches(batches: list[WindowBatch], settings: Settings, work_root: str,
                           device: str = "auto") -> list[tuple[str, str, int, float]]:
    """Restore window batches (each against its image's coarse result); returns
    (relpath, work URI, NFE, seconds) per batch."""
    from gdp.hierarchical import restore_windows
    device = resolve_device(device)
    prior = cached_prior(settings.prior, settings.preset, device, settings.precision)
    out = []
    for batch in batches:
        job = batch.job
        _, op, y, _ = _observation(job, settings)
        plan = _hierarchical_plan(job, settings, prior.image_size, op)
        coarse, meta = _load_tile(join_uri(work_root, image_key(job) + ".coarse.safetensors"), settings.storage_options,
                                  settings.retry_seconds)
        bind_estimate(op, meta)
        with device_lock(device):
            t0 = time.perf_counter()
            patches, nfe = restore_windows(y.to(device), op, prior, plan, coarse[None].to(device), list(batch.indices),
                                           settings.steps, settings.seed, _guidance(settings), settings.batch_size)
            seconds = time.perf_counter() - t0
        uri = join_uri(work_root, f"{image_key(job)}.w{batch.indices[0]:06d}.safetensors")
        _save_tile(uri, patches.cpu(), {"indices": json.dumps(list(batch.indices))}, settings.storage_options,
                   settings.retry_seconds)
        out.append((job.relpath, uri, nfe, seconds))
    return out


def merge_parts(job: ImageJob, parts: tuple[str, ...], settings: Settings, op) -> torch.Tensor:
    """Stream the window batches of a hierarchical image into `[1, C, H, W]` (output + one row of windows)."""
    from gdp.tiling import StreamingMerger
    merger = None
    for uri in sorted(parts):  # file names carry the first window index: row-major order
        patches, meta = _load_tile(uri, settings.storage_options, settings.retry_seconds)
        if merger is None:
            plan = _hierarchical_plan(job, settings, patches.shape[-1], op)
            merger = StreamingMerger(job.height, job.width, patches.shape[1], plan.patch, plan.stride, settings.blend)
        for k, p in zip(json.loads(meta["indices"]), patches):
            merger.add(merger.windows[k], p)
    return merger.finish()[None]


# ---------------------------------------------------------------------------------------------
# assemble and manifest


def assemble(result: ImageResult, settings: Settings, prior_id: str, config_hash: str, run_id: str,
             reference_uri: str | None = None) -> dict:
    """Write the restored image next to its relative path (input format, bit depth, ICC/EXIF kept),
    compute metrics, remove the work file; returns the manifest row."""
    from gdp.metrics import psnr, ssim
    from gdp.restore import finish_output
    job = result.job
    row = manifest_row(job, settings, prior_id, config_hash, run_id)
    if result.error:
        return {**row, "status": "failed", "error": result.error}
    consistency, estimated = result.consistency_psnr, result.estimated
    if result.parts:  # hierarchical: merge the window batches, score consistency against y here
        from gdp.metrics import consistency_psnr
        src, op, y, gray = _observation(job, settings)
        if getattr(op, "blind", False):
            _, meta = _load_tile(posixpath.join(posixpath.dirname(result.parts[0]), image_key(job) + ".coarse.safetensors"),
                                 settings.storage_options, settings.retry_seconds)
            bind_estimate(op, meta)
            estimated = meta["estimated"]
        pixels = merge_parts(job, result.parts, settings, op)
        consistency = float(consistency_psnr(op, pixels, y)[0])
        image = finish_output(pixels, settings.task, gray)
    else:
        pixels, meta = _load_tile(result.work_uri, settings.storage_options, settings.retry_seconds)
        image = finish_output(pixels[None], settings.task, meta.get("gray") == "True")
        src = retrying(settings.retry_seconds, read_image, job.source_uri,  # ICC/EXIF to carry over
                       **settings.storage_options)
    retrying(settings.retry_seconds, write_image, job.output_uri, image, bit_depth=src.bit_depth,
             icc_profile=src.icc_profile, exif=src.exif, dpi=src.dpi_for(image.shape[-1], image.shape[-2]),
             protect=job.source_uri, **settings.storage_options)
    output_sha = retrying(settings.retry_seconds, sha256_uri, job.output_uri, settings.storage_options)
    row.update(status="ok", output_sha256=output_sha, nfe=result.nfe, seconds=round(result.seconds, 3),
               estimated_params_json=estimated,
               consistency_psnr=consistency, n_patches=result.tiling.get("n_patches", job.n_patches))
    if reference_uri:
        ref = retrying(settings.retry_seconds, read_image, join_uri(reference_uri, job.relpath),
                       **settings.storage_options).pixels
        if ref.shape[-2:] != image.shape[-2:]:
            raise ImageError(join_uri(reference_uri, job.relpath),
                             f"reference is {ref.shape[-1]}x{ref.shape[-2]}, output is {image.shape[-1]}x{image.shape[-2]}")
        top = 255.0 if src.bit_depth == 8 else 65535.0
        written = (image.clamp(0, 1) * top).round() / top  # metrics of the file as written (exact for PNG/TIFF)
        out = written.expand_as(ref) if ref.shape[1] == 3 else written.mean(dim=1, keepdim=True)
        row.update(psnr=float(psnr(out, ref)[0]), ssim=float(ssim(out, ref)[0]))
    coarse = posixpath.join(posixpath.dirname(result.parts[0]), image_key(job) + ".coarse.safetensors") \
        if result.parts else ""
    for uri in (result.work_uri, *result.parts, coarse):
        if uri:
            retrying(settings.retry_seconds, _remove, uri, settings.storage_options)
    return row


def _remove(uri: str, storage_options: dict) -> None:
    """Delete one file; one already gone (an earlier attempt's) is fine."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass


def manifest_row(job: ImageJob, settings: Settings, prior_id: str, config_hash: str, run_id: str) -> dict:
    return {"source_uri": job.source_uri, "output_uri": job.output_uri, "status": job.status, "error": job.error,
            "task": settings.task, "params_json": json.dumps(settings.result_config(prior_id), sort_keys=True, default=str),
            "width": job.width, "height": job.height, "n_patches": job.n_patches, "steps": settings.steps,
            "nfe": 0, "seconds": 0.0, "consistency_psnr": None, "psnr": None, "ssim": None,
            "estimated_params_json": "{}", "seed": settings.seed, "prior_id": prior_id, "config_hash": config_hash,
            "content_sha256": job.content_sha256, "output_sha256": "", "flow_run_id": run_id,
            "finished_at": datetime.now(timezone.utc)}


def manifest_schema():
    import pyarrow as pa
    return pa.schema([
        ("source_uri", pa.string()), ("output_uri", pa.string()), ("status", pa.string()), ("error", pa.string()),
        ("task", pa.string()), ("params_json", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
        ("n_patches", pa.int64()), ("steps", pa.int64()), ("nfe", pa.int64()), ("seconds", pa.float64()),
        ("consistency_psnr", pa.float64()), ("psnr", pa.float64()), ("ssim", pa.float64()),
        ("estimated_params_json", pa.string()), ("seed", pa.int64()), ("prior_id", pa.string()),
        ("config_hash", pa.string()), ("content_sha256", pa.string()), ("output_sha256", pa.string()),
        ("flow_run_id", pa.string()),
        ("finished_at", pa.timestamp("us", tz="UTC")),
    ])


def write_manifest(rows: list[dict], output_root: str, run_id: str, storage_options: dict | None = None,
                   folder: str = MANIFEST_DIR, retry_seconds: float = Settings.retry_seconds) -> str:
    """One Parquet file per run at OUTPUT/<folder>/run-<run_id>.parquet (written in one upload)."""
    uri = join_uri(output_root, folder, f"run-{run_id}.parquet")
    _write_rows(rows, uri, storage_options, retry_seconds)
    return uri


def shard_manifest_uri(output_root: str, run_id: str) -> str:
    """Where the child run `run_id` of a sharded run writes its partial manifest."""
    return join_uri(output_root, MANIFEST_DIR, SHARD_MANIFEST_DIR, f"run-{run_id}.parquet")


def read_manifest(uri: str, storage_options: dict | None = None, retry_seconds: float = Settings.retry_seconds) -> list[dict]:
    import pyarrow.parquet as pq
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return pq.read_table(io.BytesIO(retrying(retry_seconds, fs.cat_file, path))).to_pylist()


def journal_row(row: dict, output_root: str, run_id: str, storage_options: dict | None = None,
                retry_seconds: float = Settings.retry_seconds) -> str:
    """Record one finished input at once, so that a run that dies before its manifest loses nothing:
    `previous_successes` reads journals, and a re-run skips the input instead of writing it again."""
    name = hashlib.sha1(row["source_uri"].encode()).hexdigest()[:16] + ".parquet"
    uri = join_uri(output_root, MANIFEST_DIR, JOURNAL_DIR, f"run-{run_id}", name)
    _write_rows([row], uri, storage_options, retry_seconds)
    return uri


def clear_journal(output_root: str, run_id: str, storage_options: dict | None = None,
                  retry_seconds: float = Settings.retry_seconds) -> None:
    """Drop a run's journal once its manifest holds the same rows."""
    retrying(retry_seconds, _remove_tree, join_uri(output_root, MANIFEST_DIR, JOURNAL_DIR, f"run-{run_id}"),
             storage_options or {})


def _remove_tree(uri: str, storage_options: dict) -> None:
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _write_rows(rows: list[dict], uri: str, storage_options: dict | None = None,
                retry_seconds: float = Settings.retry_seconds) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = manifest_schema()
    table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    retrying(retry_seconds, _put_atomic, uri, buf.getvalue(), storage_options)


def summarise(rows: list[dict]) -> dict:
    """Counts and mean/min metrics for the run's summary artifact."""
    ok = [r for r in rows if r["status"] == "ok"]
    megapixels = sum(r["width"] * r["height"] for r in ok) / 1e6
    seconds = sum(r["seconds"] for r in ok)

    def stat(key, fn):
        values = [r[key] for r in ok if r.get(key) is not None]
        return round(fn(values), 3) if values else None

    return {"images": len(rows), "ok": len(ok), "skipped": sum(r["status"] == "skipped" for r in rows),
            "failed": sum(r["status"] == "failed" for r in rows),
            "mean_consistency_psnr": stat("consistency_psnr", lambda v: sum(v) / len(v)),
            "min_consistency_psnr": stat("consistency_psnr", min),
            "mean_psnr": stat("psnr", lambda v: sum(v) / len(v)), "min_psnr": stat("psnr", min),
            "mean_ssim": stat("ssim", lambda v: sum(v) / len(v)),
            "seconds_per_megapixel": round(seconds / megapixels, 2) if megapixels else None}
