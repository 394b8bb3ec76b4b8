"""The one place where Kinema touches ComfyUI.

Every other module of the pack asks this one for model folders, the output
folder, progress, interrupts and devices. Each ComfyUI import is guarded: in a
plain Python process (tests, the headless runner) the same functions fall back
to plain implementations driven by environment variables and setters:

- models: ``set_models_dir(path)`` or ``KINEMA_MODELS_DIR`` (``<dir>/<kind>/...``,
  default ``./models``), plus ``add_model_folder(kind, path)``;
- output / input / temp: ``set_output_dir`` / ``KINEMA_OUTPUT_DIR`` (default
  ``./output``), ``set_input_dir`` / ``KINEMA_INPUT_DIR`` (``./input``),
  ``set_temp_dir`` / ``KINEMA_TEMP_DIR`` (``./temp``);
- interrupts: ``request_interrupt()`` makes the next ``check_interrupt()`` raise
  ``KinemaInterrupted``;
- devices: ``KINEMA_DEVICE`` overrides the compute device.

Model names are always checked before a file is opened: a name that leaves its
folder (``../x``, an absolute path, a link that resolves outside every
registered folder of its kind) raises ``KinemaError``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models import memory, placement
from ..models.errors import KinemaError
from ..models.placement import Placement

logger = logging.getLogger("kinema")

# --- guarded host imports -------------------------------------------------------------------
try:  # pragma: no cover - only inside ComfyUI
    import folder_paths as _folder_paths
except Exception:  # ImportError, or a half-configured host
    _folder_paths = None

try:  # pragma: no cover - only inside ComfyUI
    import comfy.utils as _comfy_utils
except Exception:
    _comfy_utils = None

try:  # pragma: no cover - only inside ComfyUI
    import comfy.model_management as _comfy_mm
except Exception:
    _comfy_mm = None

try:  # pragma: no cover - only inside ComfyUI
    from comfy.cli_args import args as _comfy_args
except Exception:
    _comfy_args = None

IN_COMFYUI: bool = _folder_paths is not None

# --- model folders --------------------------------------------------------------------------
MODEL_EXTENSIONS: tuple[str, ...] = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")

#: The kinds Kinema adds to ComfyUI (``ipadapter``: ComfyUI_IPAdapter_plus's folder, models/ipadapter);
#: ``checkpoints``, ``loras``, ``vae``, ``clip_vision`` and ``controlnet`` are ComfyUI's own.
KINEMA_MODEL_KINDS: tuple[str, ...] = ("animatediff_models", "animatediff_motion_lora", "depth_models", "ipadapter")
#: kinds whose models are folders (transformers ``config.json`` + weights), listed by ``list_model_dirs``
MODEL_DIR_KINDS: tuple[str, ...] = ("depth_models",)

_state_lock = threading.RLock()
_models_dir: str | None = None
_extra_model_folders: dict[str, list[str]] = {}
_output_dir: str | None = None
_input_dir: str | None = None
_temp_dir: str | None = None


def _allow_external_links() -> bool:
    return os.environ.get("KINEMA_ALLOW_SYMLINKS", "").strip().lower() in ("1", "true", "yes")


def register_model_folders() -> None:
    """Register Kinema's model kinds with ComfyUI at ``<models_dir>/<kind>``.

    Idempotent. Folders already registered for a kind (another pack,
    ``extra_model_paths.yaml``) are kept; the default folder is appended if
    missing and the model extensions are added to the kind's filter. Outside
    ComfyUI this does nothing: folders come from ``set_models_dir`` /
    ``KINEMA_MODELS_DIR``.
    """
    fp = _folder_paths
    if fp is None:
        return
    with _state_lock:
        for kind in KINEMA_MODEL_KINDS:
            default = os.path.join(fp.models_dir, kind)
            entry = fp.folder_names_and_paths.get(kind)
            if entry is None:
                fp.folder_names_and_paths[kind] = ([default], set(MODEL_EXTENSIONS))
            else:
                paths, exts = entry
                paths = list(paths)
                if default not in paths:
                    paths.append(default)
                # an empty filter means "every file"; for these kinds we want model files
                exts = set(exts) | set(MODEL_EXTENSIONS) if exts else set(MODEL_EXTENSIONS)
                fp.folder_names_and_paths[kind] = (paths, exts)
            cache = getattr(fp, "filename_list_cache", None)
            if isinstance(cache, dict):
                cache.pop(kind, None)


def set_models_dir(path: str | None) -> None:
    """Fallback only: the folder holding ``<kind>/`` subfolders (None: back to env/default)."""
    global _models_dir
    if _folder_paths is not None:
        logger.warning("set_models_dir(%r) ignored inside ComfyUI: use extra_model_paths.yaml", path)
    _models_dir = None if path is None else os.path.abspath(path)


def get_models_dir() -> str:
    """The folder holding ``<kind>/`` subfolders (ComfyUI's ``models_dir`` when hosted)."""
    if _folder_paths is not None:
        return _folder_paths.models_dir
    return os.path.abspath(_models_dir or os.environ.get("KINEMA_MODELS_DIR") or "models")


def add_model_folder(kind: str, path: str) -> None:
    """Register one more folder for ``kind`` (ComfyUI: ``folder_paths.add_model_folder_path``)."""
    path = os.path.abspath(path)
    if _folder_paths is not None:
        _folder_paths.add_model_folder_path(kind, path)
        return
    with _state_lock:
        folders = _extra_model_folders.setdefault(kind, [])
        if path not in folders:
            folders.append(path)


def model_folders(kind: str) -> list[str]:
    """Every folder searched for ``kind``, in search order (they need not exist)."""
    if _folder_paths is not None:
        try:
            return list(_folder_paths.get_folder_paths(kind))
        except KeyError:
            raise KinemaError(
                f"ComfyUI has no model folder kind '{kind}'. Known kinds: "
                f"{', '.join(sorted(_folder_paths.folder_names_and_paths))}"
            ) from None
    if not isinstance(kind, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", kind) or kind in (".", ".."):
        raise KinemaError(f"'{kind}' is not a model folder kind")
    return [os.path.join(get_models_dir(), kind)] + list(_extra_model_folders.get(kind, []))


def _clean_name(kind: str, name: str) -> str:
    """A model name as ``a/b/c`` relative to its folder, or KinemaError if it leaves it."""
    if not isinstance(name, str) or not name.strip():
        raise KinemaError(f"No {kind} model selected: pick a file from the list")
    if "\x00" in name:
        raise KinemaError(f"{kind} model name {name!r} contains a NUL character")
    flat = name.replace("\\", "/")
    if flat.startswith("/") or re.match(r"^[A-Za-z]:", flat):
        raise KinemaError(
            f"{kind} model name '{name}' is an absolute path; names are relative to the "
            f"{kind} folder(s). Put the file in one of: {', '.join(model_folders(kind))}"
        )
    parts = [p for p in flat.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise KinemaError(f"{kind} model name '{name}' leaves the {kind} folder ('..' is not allowed)")
    if not parts:
        raise KinemaError(f"{kind} model name '{name}' names no file")
    return "/".join(parts)


def _inside(path: str, root: str) -> bool:
    path, root = os.path.normcase(path), os.path.normcase(root)
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives
        return False


def stays_inside(path: str, roots: list[str]) -> bool:
    """True when ``path``, links resolved, lies inside one of ``roots`` (real paths), or KINEMA_ALLOW_SYMLINKS=1
    allows links out: what the model and input lists show (the resolvers refuse the rest)."""
    return _allow_external_links() or any(_inside(os.path.realpath(path), r) for r in roots)


def _check_real_location(kind: str, name: str, full: str, folders: list[str]) -> str:
    """Refuse a file that, links resolved, lies outside every folder of its kind."""
    real = os.path.realpath(full)
    roots = [os.path.realpath(f) for f in folders]
    if any(_inside(real, r) for r in roots) or _allow_external_links():
        return os.path.abspath(full)
    raise KinemaError(
        f"{kind} model '{name}' resolves to '{real}', outside the {kind} folder(s) "
        f"{', '.join(folders)}. Move the file into the folder, or register its real folder "
        f"({'extra_model_paths.yaml' if _folder_paths is not None else 'add_model_folder / KINEMA_MODELS_DIR'}); "
        "set KINEMA_ALLOW_SYMLINKS=1 to follow such links anyway."
    )


def _walk_files(root: str) -> list[str]:
    """Relative paths (forward slashes) of files under root, following links without looping."""
    out: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        for f in filenames:
            rel = f if rel_dir == "." else os.path.join(rel_dir, f)
            out.append(rel.replace(os.sep, "/"))
    return out


def _fix_hint(kind: str) -> str:
    if _folder_paths is not None:
        return (f"Put the file in one of these folders (subfolders are fine) or add its folder to "
                f"extra_model_paths.yaml under '{kind}', then refresh the page (R).")
    return (f"Put the file there (subfolders are fine), or point KINEMA_MODELS_DIR / set_models_dir() "
            f"at the folder that holds '{kind}/', or call add_model_folder('{kind}', path).")


def list_models(kind: str) -> list[str]:
    """Model files of ``kind``, relative to their folder, sorted (fallback names use '/')."""
    folders = model_folders(kind)
    if _folder_paths is not None:
        names = list(_folder_paths.get_filename_list(kind))
    else:
        names = set()
        for folder in folders:
            if os.path.isdir(folder):
                names.update(n for n in _walk_files(folder) if n.lower().endswith(MODEL_EXTENSIONS))
        names = sorted(names)
    if _allow_external_links():
        return names
    roots = [os.path.realpath(f) for f in folders]
    kept = []
    for n in names:  # hide files resolve_model would refuse
        for folder in folders:
            full = os.path.join(folder, n)
            if os.path.isfile(full):
                if stays_inside(full, roots):
                    kept.append(n)
                else:
                    logger.debug("hiding %s model %s: it links outside the %s folders", kind, n, kind)
                break
    return kept


def resolve_model(kind: str, name: str) -> str:
    """Absolute path of model file ``name`` of ``kind``; KinemaError if it escapes or is missing."""
    clean = _clean_name(kind, name)
    folders = model_folders(kind)
    full = None
    if _folder_paths is not None:
        full = _folder_paths.get_full_path(kind, clean.replace("/", os.sep))
    else:
        for folder in folders:
            candidate = os.path.join(folder, *clean.split("/"))
            if os.path.isfile(candidate):
                full = candidate
                break
    if full is None:
        available = list_models(kind) if any(os.path.isdir(f) for f in folders) else []
        listing = (f" Available: {', '.join(available[:10])}{' ...' if len(available) > 10 else ''}."
                   if available else " The folder(s) hold no model files.")
        raise KinemaError(
            f"{kind} model '{name}' not found. Searched: {', '.join(folders)}.{listing} {_fix_hint(kind)}"
        )
    return _check_real_location(kind, name, full, folders)


#: what ComfyUI tries after an embedding's name, in order
EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")


def find_embedding(name: str) -> str | None:
    """The file of the textual-inversion embedding ``name`` (``embedding:name`` in a prompt), looked up as ComfyUI
    does: in each ``embeddings`` folder, the name as written, then with .safetensors, .pt, .bin. None when there
    is none, or the name would leave the folders (ComfyUI skips those too); KinemaError for a file found there that
    is a link leading outside every embeddings folder (as the model loaders refuse one, unless
    ``KINEMA_ALLOW_SYMLINKS``)."""
    try:
        clean = _clean_name("embeddings", name)
        folders = model_folders("embeddings")
    except KinemaError:
        return None
    for folder in folders:
        base = os.path.join(folder, *clean.split("/"))
        for candidate in (base, *(base + ext for ext in EMBEDDING_EXTENSIONS)):
            if os.path.isfile(candidate):
                return _check_real_location("embeddings", name, candidate, folders)
    return None


def list_model_dirs(kind: str, marker: str = "config.json") -> list[str]:
    """Model *folders* of ``kind`` (e.g. transformers depth models): subfolders holding ``marker``.

    Names are relative to the kind's folders, with '/'; inside ComfyUI the kind's folders are
    ComfyUI's (``extra_model_paths.yaml`` included). Folders that ``resolve_model_dir`` would
    refuse (links leading outside every folder of the kind) are hidden, as ``list_models`` does.
    """
    folders = model_folders(kind)
    roots = [os.path.realpath(f) for f in folders]
    names = set()
    for folder in folders:
        if os.path.isdir(folder):
            for rel in _walk_files(folder):
                head, _, tail = rel.rpartition("/")
                if tail != marker or not head or head in names:
                    continue
                real = os.path.realpath(os.path.join(folder, *head.split("/")))
                if _allow_external_links() or any(_inside(real, r) for r in roots):
                    names.add(head)
                else:
                    logger.debug("hiding %s model folder %s: it links outside the %s folders", kind, head, kind)
    return sorted(names)


def resolve_model_dir(kind: str, name: str) -> str:
    """Absolute path of model folder ``name`` of ``kind``, with the same checks as ``resolve_model``."""
    clean = _clean_name(kind, name)
    folders = model_folders(kind)
    for folder in folders:
        candidate = os.path.join(folder, *clean.split("/"))
        if os.path.isdir(candidate):
            return _check_real_location(kind, name, candidate, folders)
    available = list_model_dirs(kind)
    listing = (f" Available: {', '.join(available[:10])}{' ...' if len(available) > 10 else ''}."
               if available else " The folder(s) hold no model folders (a subfolder with a config.json).")
    raise KinemaError(
        f"{kind} model folder '{name}' not found. Searched: {', '.join(folders)}.{listing} Put the whole model "
        f"folder (config.json and weights) in one of them. {_fix_hint(kind)}"
    )


# --- input / output / temp folders ----------------------------------------------------------
def set_output_dir(path: str | None) -> None:
    """Fallback only: where outputs go (None: back to ``KINEMA_OUTPUT_DIR`` / ``./output``)."""
    global _output_dir
    _output_dir = None if path is None else os.path.abspath(path)


def set_input_dir(path: str | None) -> None:
    """Fallback only: where inputs are read (None: back to ``KINEMA_INPUT_DIR`` / ``./input``)."""
    global _input_dir
    _input_dir = None if path is None else os.path.abspath(path)


def set_temp_dir(path: str | None) -> None:
    """Fallback only: where previews go (None: back to ``KINEMA_TEMP_DIR`` / ``./temp``)."""
    global _temp_dir
    _temp_dir = None if path is None else os.path.abspath(path)


def get_output_directory() -> str:
    if _folder_paths is not None:
        return _folder_paths.get_output_directory()
    return os.path.abspath(_output_dir or os.environ.get("KINEMA_OUTPUT_DIR") or "output")


def get_input_directory() -> str:
    if _folder_paths is not None:
        return _folder_paths.get_input_directory()
    return os.path.abspath(_input_dir or os.environ.get("KINEMA_INPUT_DIR") or "input")


def resolve_input(name: str) -> str:
    """Absolute path of ``name`` (``sub/clip.mp4``, ComfyUI's ``clip.mp4 [input]``) in the input folder.

    The file need not exist. KinemaError if the name leaves the folder (``..``, an
    absolute path, a link resolving outside it unless ``KINEMA_ALLOW_SYMLINKS=1``).
    """
    root = get_input_directory()
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise KinemaError(f"No input file selected (got {name!r}): pick a file from the list")
    flat = re.sub(r"\s*\[input\]$", "", name.strip()).replace("\\", "/")
    parts = [p for p in flat.split("/") if p not in ("", ".")]
    if flat.startswith("/") or re.match(r"^[A-Za-z]:", flat) or ".." in parts or not parts:
        raise KinemaError(f"Input file name '{name}' points outside the input folder {root}: "
                          "give a name relative to it (put the file in the input folder or upload it)")
    full = os.path.join(root, *parts)
    if os.path.exists(full) and not _inside(os.path.realpath(full), os.path.realpath(root)) \
            and not _allow_external_links():
        raise KinemaError(f"Input file '{name}' resolves to '{os.path.realpath(full)}', outside the input folder "
                          f"{root}; set KINEMA_ALLOW_SYMLINKS=1 to follow such links anyway")
    return full


_shared_input_dirs: set[str] = set()


def share_inputs(files: dict[str, str]) -> None:
    """Copy ``files`` (name -> path) into ComfyUI's input folder where no file of that name is, once per folder.

    The frontend previews an input through ``/view?type=input``, which serves that folder only: the pack's demo
    clip and image are read from the pack, but shown only once they are there too. Inside ComfyUI only; a file is
    never overwritten (a file of that name made meanwhile wins) nor left half-copied; a folder that cannot be
    written is left as it is (the files are still read from the pack).
    """
    if _folder_paths is None:
        return
    root = get_input_directory()
    with _state_lock:
        if root in _shared_input_dirs:
            return
        _shared_input_dirs.add(root)
    for name, src in files.items():
        dst = os.path.join(root, name)
        if os.path.lexists(dst):
            continue
        tmp = os.path.join(root, f".{name}.{os.getpid()}.{threading.get_ident()}.part")
        try:
            os.makedirs(root, exist_ok=True)
            shutil.copyfile(src, tmp)
            try:
                os.link(tmp, dst)  # fails if a file of that name appeared meanwhile: it is kept
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links
                if not os.path.lexists(dst):
                    os.replace(tmp, dst)
        except OSError as e:
            logger.debug("Kinema: could not copy %s into the input folder %s (%s): it is read from the pack",
                         name, root, e)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def get_temp_directory() -> str:
    if _folder_paths is not None:
        return _folder_paths.get_temp_directory()
    return os.path.abspath(_temp_dir or os.environ.get("KINEMA_TEMP_DIR") or "temp")


def metadata_enabled() -> bool:
    """False when ComfyUI runs with ``--disable-metadata`` (or ``KINEMA_DISABLE_METADATA=1``)."""
    if os.environ.get("KINEMA_DISABLE_METADATA", "").strip().lower() in ("1", "true", "yes"):
        return False
    return not _flag("disable_metadata")


def _expand_prefix_vars(prefix: str, width: int, height: int) -> str:
    now = time.localtime()
    values = {
        "%width%": str(width), "%height%": str(height), "%year%": str(now.tm_year),
        "%month%": f"{now.tm_mon:02}", "%day%": f"{now.tm_mday:02}", "%hour%": f"{now.tm_hour:02}",
        "%minute%": f"{now.tm_min:02}", "%second%": f"{now.tm_sec:02}",
    }
    for key, value in values.items():
        prefix = prefix.replace(key, value)
    return prefix


NAME_MAX = 255  # bytes of one file or folder name (Linux, macOS; Windows: 255 UTF-16 characters)


def _shorten(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit - 3] + "...")


def _split_prefix(filename_prefix: str, output_dir: str) -> tuple[str, str]:
    """(subfolder, name) of a prefix; KinemaError if it leaves the output folder."""
    if not isinstance(filename_prefix, str) or filename_prefix.strip() in ("", ".", "/"):
        raise KinemaError("filename_prefix is empty: give a name such as 'Kinema/video'")
    if "\x00" in filename_prefix:
        raise KinemaError("filename_prefix contains a NUL character")
    norm = os.path.normpath(filename_prefix.replace("\\", "/"))
    subfolder, name = os.path.dirname(norm), os.path.basename(norm)
    # the longest name a file system takes is 255 bytes; the saved file adds its counter and extension
    long = [part for part in (*norm.split(os.sep)[:-1], f"{name}_00000_.webp") if len(part.encode()) > NAME_MAX]
    if long:
        raise KinemaError(f"filename_prefix has a folder or file name too long for the file system "
                          f"({_shorten(long[0])}, {len(long[0].encode())} bytes; at most {NAME_MAX}): shorten it")
    folder = os.path.abspath(os.path.join(output_dir, subfolder))
    if os.path.isabs(norm) or not _inside(folder, os.path.abspath(output_dir)) or name in ("", ".", ".."):
        raise KinemaError(
            f"filename_prefix '{filename_prefix}' points outside the output folder {output_dir}; "
            "use a relative prefix such as 'Kinema/video'"
        )
    return subfolder, name


def _next_counter(folder: str, name: str) -> int:
    """ComfyUI's convention: one more than the highest ``{name}_{counter}_...`` in folder."""
    best = 0
    want = os.path.normcase(name)
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return 1
    for entry in entries:
        if os.path.normcase(entry[: len(name)]) != want or entry[len(name): len(name) + 1] != "_":
            continue
        try:
            best = max(best, int(entry[len(name) + 1:].split("_")[0]))
        except ValueError:
            continue
    return best + 1


def save_path(filename_prefix: str, ext: str, width: int = 0, height: int = 0) -> tuple[str, str, str]:
    """``(full_path, subfolder, filename)`` for a new output file, named ``{prefix}_{counter:05}_.{ext}``.

    ``filename_prefix`` may hold a subfolder (``Kinema/video``; a backslash separates folders too, on every system)
    and ComfyUI's ``%width%``/``%year%``-style variables. The folder is created; the name returned never exists yet.
    Inside ComfyUI its ``get_save_image_path`` numbers the file, given the prefix as read here (variables expanded,
    folders split): ComfyUI itself splits at the system's separator only, so a workflow's ``Kinema\\video`` would be
    one file name on Linux and a folder on Windows.
    """
    ext = str(ext).lstrip(".")
    if not re.fullmatch(r"[A-Za-z0-9]+", ext):
        raise KinemaError(f"'{ext}' is not a file extension")
    output_dir = get_output_directory()
    subfolder, name = _split_prefix(_expand_prefix_vars(filename_prefix, width, height), output_dir)
    folder = os.path.join(output_dir, subfolder)
    try:
        if _folder_paths is not None:
            folder, name, counter, subfolder, _ = _folder_paths.get_save_image_path(
                os.path.join(subfolder, name), output_dir, width, height)
        else:
            counter = _next_counter(folder, name)
        os.makedirs(folder, exist_ok=True)
    except OSError as e:  # a file where a folder of the prefix should be, a folder that is not writable
        raise KinemaError(f"cannot save into the output folder '{folder}' ({e.strerror or e}): a file of that name "
                          "is in the way or the folder is not writable; choose another filename_prefix") from e
    while True:
        filename = f"{name}_{counter:05}_.{ext}"
        full = os.path.join(folder, filename)
        if not os.path.lexists(full):
            return full, subfolder.replace(os.sep, "/"), filename
        counter += 1


# --- interrupts and progress ----------------------------------------------------------------
class KinemaInterrupted(InterruptedError):
    """The user asked to stop (fallback of ComfyUI's interrupt)."""


_interrupt_lock = threading.Lock()
_interrupt_requested = False


def request_interrupt(value: bool = True) -> None:
    """Ask the running job to stop at its next ``check_interrupt`` (ComfyUI: its own flag)."""
    global _interrupt_requested
    if _comfy_mm is not None:
        _comfy_mm.interrupt_current_processing(value)
        return
    with _interrupt_lock:
        _interrupt_requested = bool(value)


def check_interrupt() -> None:
    """Raise if an interrupt was requested (and clear the request)."""
    global _interrupt_requested
    if _comfy_mm is not None:
        _comfy_mm.throw_exception_if_processing_interrupted()
        return
    with _interrupt_lock:
        if not _interrupt_requested:
            return
        _interrupt_requested = False
    raise KinemaInterrupted("Kinema: interrupted by request")


class ProgressBar:
    """Step progress: ComfyUI's bar (which also stops on interrupt) or a stderr line.

    ``update(n)`` advances by n, ``update_absolute(value, total=None, preview=None)``
    sets the position; both check for an interrupt.
    """

    def __init__(self, total: int, desc: str = "Kinema"):
        self.total = max(int(total), 0)
        self.current = 0
        self.desc = desc
        self._start = time.monotonic()
        self._last_log = -1.0
        self._bar = _comfy_utils.ProgressBar(self.total) if _comfy_utils is not None else None

    def update(self, n: int = 1) -> None:
        self.update_absolute(self.current + n)

    def update_absolute(self, value: int, total: int | None = None, preview=None) -> None:
        if total is not None:
            self.total = max(int(total), 0)
        self.current = min(int(value), self.total) if self.total else int(value)
        if self._bar is not None:
            self._bar.update_absolute(self.current, self.total, preview)
        else:
            self._report()
        check_interrupt()

    def _report(self) -> None:
        elapsed = time.monotonic() - self._start
        rate = self.current / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * self.current / self.total if self.total else 100.0
        done = self.total and self.current >= self.total
        stream = sys.stderr
        if stream is not None and getattr(stream, "isatty", lambda: False)():
            width = 24
            fill = int(width * pct / 100)
            stream.write(f"\r{self.desc}: [{'#' * fill}{' ' * (width - fill)}] "
                         f"{self.current}/{self.total} {rate:.2f} it/s")
            if done:
                stream.write("\n")
            stream.flush()
        elif done or elapsed - self._last_log >= 5.0:  # keep logs quiet: every 5 s and at the end
            self._last_log = elapsed
            logger.info("%s: %d/%d (%.0f%%) %.2f it/s", self.desc, self.current, self.total, pct, rate)


def latent_previewer() -> Callable | None:
    """ComfyUI's step previewer for SD-family latents (SD1.5, SVD), as the user set previews up
    (``--preview-method``: latent2rgb, or TAESD with ``models/vae_approx/taesd_decoder``): a function from a
    scaled latent ``[1, 4, h, w]`` to the preview that ``ProgressBar.update_absolute`` takes. None outside ComfyUI
    or with previews off. A preview that fails is logged once and previews stop; sampling goes on."""
    if _comfy_utils is None:
        return None
    try:  # pragma: no cover - only inside ComfyUI
        import comfy.latent_formats
        import latent_preview
    except ImportError:
        return None
    try:
        previewer = latent_preview.get_previewer(compute_device(), comfy.latent_formats.SD15())
    except Exception as e:  # noqa: BLE001 - a damaged TAESD file, say: previews off, sampling goes on
        logger.warning("Kinema: step previews are off for this run (ComfyUI's previewer could not be set up: %s)", e)
        return None
    if previewer is None:
        return None
    return _guarded_preview(lambda latent: previewer.decode_latent_to_preview_image("JPEG", latent))


def _guarded_preview(make: Callable) -> Callable:
    """``make`` that returns None from its first failure on (logged once): a preview never stops sampling."""
    broken = []

    def preview(latent):
        if broken:
            return None
        try:
            return make(latent)
        except Exception as e:  # noqa: BLE001 - any previewer failure: previews off, sampling goes on
            broken.append(e)
            logger.warning("Kinema: step previews are off for this run (the previewer failed: %s)", e)
            return None

    return preview


# --- devices --------------------------------------------------------------------------------
def compute_device() -> torch.device:
    """Where models run: ComfyUI's torch device, else ``KINEMA_DEVICE``, the CPU for ``KINEMA_VRAM=cpu``, CUDA
    or CPU. A CUDA device always with its index (``cuda:0``, as a tensor's ``.device`` says it): a bare ``cuda``
    would never equal where the weights already are, and every run would treat them as elsewhere."""
    if _comfy_mm is not None:
        return _with_index(_comfy_mm.get_torch_device())
    env = os.environ.get("KINEMA_DEVICE")
    if env:
        try:
            return _with_index(torch.device(env))
        except RuntimeError as e:
            raise KinemaError(f"KINEMA_DEVICE='{env}' is not a torch device ({e}): set it to cpu, cuda or "
                              "cuda:N, or unset it") from None
    if _env_vram() == "cpu":
        return torch.device("cpu")
    return _with_index(torch.device("cuda")) if torch.cuda.is_available() else torch.device("cpu")


def _with_index(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _env_vram() -> str:
    vram = os.environ.get("KINEMA_VRAM", "normal")
    if vram not in memory.VRAM_STATES:
        raise KinemaError(f"KINEMA_VRAM='{vram}' is not a VRAM mode: set it to one of "
                          f"{', '.join(memory.VRAM_STATES)}, or unset it")
    return vram


def offload_device() -> torch.device:
    """Where idle weights wait: ComfyUI's unet offload device, else the CPU."""
    if _comfy_mm is not None and hasattr(_comfy_mm, "unet_offload_device"):
        return _comfy_mm.unet_offload_device()
    return torch.device("cpu")


def vram_state() -> str:
    """How much accelerator memory to count on (``memory.VRAM_STATES``): ComfyUI's VRAM state when hosted
    (--highvram, --lowvram, --novram), else ``KINEMA_VRAM``, else normal on an accelerator and cpu without one."""
    device = compute_device()
    if device.type == "cpu":
        return "cpu"
    if _comfy_mm is not None:
        state = getattr(getattr(_comfy_mm, "vram_state", None), "name", "NORMAL_VRAM")
        return {"HIGH_VRAM": "high", "LOW_VRAM": "low", "NO_VRAM": "none", "DISABLED": "cpu"}.get(state, "normal")
    return _env_vram()


def memory_defaults():
    """(the video model's default ``OffloadOptions``, the other models' default ``Placement``) for this host."""
    return memory.default_policy(vram_state(), compute_device(), offload_device())


def placed(obj):
    """``obj`` (a model a loader just made) placed after the host's defaults: see ``models.placement``."""
    return placement.place(obj, memory_defaults()[1])


def vae_device() -> torch.device:
    """Where VAEs run: the CPU under ComfyUI's --cpu-vae, else the compute device."""
    if _comfy_mm is not None and hasattr(_comfy_mm, "vae_device"):
        return _comfy_mm.vae_device()
    return compute_device()


def placed_vae(vae):
    """A VAE a loader just made, placed as ``placed`` does, or kept on the CPU under --cpu-vae."""
    device = vae_device()
    if device == compute_device():
        return placed(vae)
    return placement.place(vae, Placement(device=str(device), offload=False, storage=str(device)))


@dataclass(frozen=True)
class LoadDtypes:
    """The dtypes a loader makes its parts in: diffusion weights (UNet, motion module, ControlNet, IP-Adapter,
    depth model), VAE, and encoders (text, CLIP vision)."""

    weights: torch.dtype
    vae: torch.dtype
    encoders: torch.dtype


_FLAG_DTYPES = (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16))


def _flag(name: str) -> bool:
    return bool(getattr(_comfy_args, name, False)) if _comfy_args is not None else False


def _flagged(part: str) -> torch.dtype | None:
    """The dtype ComfyUI's command line asks for ``part`` (--fp16-unet, --bf16-vae, --fp32-text-enc, ...);
    --force-fp32 asks fp32 of every part without its own flag."""
    for prefix, dtype in _FLAG_DTYPES:
        if _flag(f"{prefix}_{part}"):
            return dtype
    return torch.float32 if _flag("force_fp32") else None


def _auto(device: torch.device) -> torch.dtype:
    """``auto`` without a flag for the part: on a GPU ComfyUI finds fp16 slow or broken on (GTX 10 / 16 series,
    before Pascal), bf16 where it supports it, else fp32; else the pack's rule (fp16 on a GPU, fp32 on the CPU)."""
    if device.type == "cuda" and _comfy_mm is not None and hasattr(_comfy_mm, "should_use_fp16"):
        try:
            if not _comfy_mm.should_use_fp16(device):
                return torch.bfloat16 if _comfy_mm.should_use_bf16(device) else torch.float32
        except Exception as exc:  # ComfyUI's API moves: the pack's own rule then
            logger.debug("ComfyUI should_use_fp16 failed: %s", exc)
    return memory.pick_dtype("auto", device)


def load_dtypes(precision: str, device: torch.device | None = None) -> LoadDtypes:
    """What a loader's ``precision`` means. fp32 / fp16 / bf16: every part in it. auto: the pack's rule (fp16 on
    a GPU, fp32 on the CPU) as ComfyUI's command line adjusts it: --force-fp32, --force-fp16, --fp32-unet /
    --fp16-unet / --bf16-unet, --fp32-vae / --fp16-vae / --bf16-vae, --fp32-text-enc / --fp16-text-enc /
    --bf16-text-enc, each for its part; a GPU without reliable fp16 (``_auto``); a VAE on the CPU (--cpu-vae) in
    fp32."""
    device = compute_device() if device is None else torch.device(device)
    if precision != "auto":
        dtype = memory.pick_dtype(precision, device)
        return LoadDtypes(dtype, dtype, dtype)
    auto = _auto(device)
    vae = _flagged("vae") or (torch.float32 if vae_device().type == "cpu" else auto)
    return LoadDtypes(_flagged("unet") or auto, vae, _flagged("text_enc") or auto)


def _reserved_vram(device: torch.device) -> int:
    """VRAM ComfyUI leaves to other programs (--reserve-vram; a few hundred MiB by default)."""
    if device.type != "cuda" or _comfy_mm is None or not hasattr(_comfy_mm, "extra_reserved_memory"):
        return 0
    try:
        return int(_comfy_mm.extra_reserved_memory())
    except Exception as exc:  # ComfyUI's API moves
        logger.debug("ComfyUI extra_reserved_memory failed: %s", exc)
        return 0


def _make_room(size: int, device: torch.device) -> None:
    """Before Kinema brings a model to the GPU, ask ComfyUI to unload its own idle models to make room."""
    if _comfy_mm is None or not hasattr(_comfy_mm, "free_memory"):
        return
    try:
        _comfy_mm.free_memory(size + (256 << 20), device)
    except Exception as exc:  # ComfyUI's API moves: never fail a run over a courtesy
        logger.debug("ComfyUI free_memory failed: %s", exc)


def soft_empty_cache() -> None:
    """Give cached accelerator memory back (ComfyUI's policy when hosted)."""
    if _comfy_mm is not None:
        _comfy_mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


register_model_folders()
placement.set_make_room(_make_room)
memory.set_reserved(_reserved_vram)
